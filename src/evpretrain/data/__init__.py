"""Datasets: the HDF5 event store, the demo and EF-ImageNet builders, the dataset registry."""
