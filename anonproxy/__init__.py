"""anonproxy: a DICOM C-STORE proxy that de-identifies under PS3.15 Annex E."""

__version__ = "0.1.0"
