"""Data: a LightningDataModule per source (covidx: COVIDx-format folders; folder: one subfolder of images per
class; phantom: the synthetic default), on the shared base (the image store, splits, loaders, augmentation,
fingerprints) and the image reader (images: PNG, JPEG, TIFF, BMP; dicom: .dcm). conf/data/ selects one."""
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
from pipeline.data.covidx import CovidxDataModule, read_label_file
from pipeline.data.dicom import read_dicom
from pipeline.data.folder import FolderDataModule, configured_classes
from pipeline.data.images import IMAGE_SUFFIXES, load_image
from pipeline.data.phantom import PhantomDataModule

__all__ = ["COVIDX_CLASSES", "IMAGE_SUFFIXES", "MAX_IMAGE_SIZE", "SPLITS", "CXRDataModule", "CovidxDataModule",
           "FolderDataModule", "GrayDataset", "PhantomDataModule", "augment_batch", "configured_classes",
           "data_fingerprint", "load_image", "patient_split", "read_dicom", "read_label_file", "to_float3"]
