"""One family of exceptions for everything a user can get wrong.

The CLI turns a VitDeployError into one line on stderr and exit code 2; anything else is a bug in
vitdeploy and keeps its traceback.
"""


class VitDeployError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class InputError(VitDeployError):
    """A file, folder or value the user passed is missing or unusable."""


class UnsupportedModelError(VitDeployError):
    """The model cannot be loaded or handled (unknown arch, wrong state_dict, NaN weights...)."""


class ExportError(VitDeployError):
    """The ONNX export or its verification failed."""


class BuildError(VitDeployError):
    """An engine could not be built for the requested target."""
