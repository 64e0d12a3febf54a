"""Segmentation + Class Activation Maps for trained nnU-Net v2 models, in the original image geometry."""
__version__ = '0.1.0'

__all__ = ['CamEngine', 'predict_with_cam', 'run_cam_for_prediction', 'run_cases', 'compare_cohorts']


def __getattr__(name):
    # lazy: `python -m nnunetv2_cam_core --list-methods` should not import torch and nnU-Net
    if name == 'compare_cohorts':
        from .report import compare_cohorts
        return compare_cohorts
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
