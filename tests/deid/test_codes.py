"""The CID 7050 codes the engine writes are those of PS3.16 as pydicom's code dictionary
lists them (the engine does not import that dictionary: see anonproxy.deid.codes)."""

from __future__ import annotations

import subprocess
import sys

from pydicom.sr.codedict import codes as pydicom_codes

from anonproxy.deid import ProfileOption, codes

KEYWORDS = {
    codes.BASIC_PROFILE: "BasicApplicationConfidentialityProfile",
    codes.CLEAN_PIXEL_DATA: "CleanPixelDataOption",
    codes.CLEAN_GRAPHICS: "CleanGraphicsOption",
    codes.CLEAN_STRUCTURED_CONTENT: "CleanStructuredContentOption",
    codes.CLEAN_DESCRIPTORS: "CleanDescriptorsOption",
    codes.RETAIN_LONGITUDINAL_FULL_DATES: "RetainLongitudinalTemporalInformationFullDatesOption",
    codes.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "RetainLongitudinalTemporalInformationModifiedDatesOption"
    ),
    codes.RETAIN_PATIENT_CHARACTERISTICS: "RetainPatientCharacteristicsOption",
    codes.RETAIN_DEVICE_IDENTITY: "RetainDeviceIdentityOption",
    codes.RETAIN_UIDS: "RetainUidsOption",
    codes.RETAIN_SAFE_PRIVATE: "RetainSafePrivateOption",
    codes.RETAIN_INSTITUTION_IDENTITY: "RetainInstitutionIdentityOption",
}


def test_each_code_is_the_one_of_pydicoms_dictionary() -> None:
    for code, keyword in KEYWORDS.items():
        expected = getattr(pydicom_codes.DCM, keyword)
        assert code == (expected.value, expected.scheme_designator, expected.meaning), keyword


def test_every_option_has_its_code() -> None:
    assert {option.code for option in ProfileOption} | {
        codes.BASIC_PROFILE,
        codes.CLEAN_PIXEL_DATA,
    } == set(KEYWORDS)


def test_the_engine_does_not_import_pydicoms_code_dictionary() -> None:
    program = "import sys, anonproxy.deid; print('pydicom.sr' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"
