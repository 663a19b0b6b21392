"""Data: a LightningDataModule per source (covidx: COVIDx-format folders; phantom: the synthetic default), on the
shared base (the image store, splits, loaders, augmentation, fingerprints). conf/data/ selects one."""
from pipeline.data.base import (
    COVIDX_CLASSES,
    MAX_IMAGE_SIZE,
    SPLITS,
    CXRDataModule,
    GrayDataset,
    augment_batch,
    data_fingerprint,
    patient_split,
    to_float3,
)
from pipeline.data.covidx import CovidxDataModule, load_image, read_label_file
from pipeline.data.phantom import PhantomDataModule

__all__ = ["COVIDX_CLASSES", "MAX_IMAGE_SIZE", "SPLITS", "CXRDataModule", "CovidxDataModule", "GrayDataset",
           "PhantomDataModule", "augment_batch", "data_fingerprint", "load_image", "patient_split", "read_label_file",
           "to_float3"]
