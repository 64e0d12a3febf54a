"""A cascade's low-resolution stage, run as nnU-Net runs it, when no previous-stage segmentations are given: the
3d_lowres model folder next to the cascade's, its folds, nnU-Net's own prediction (segmentation only)."""
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import UsageError
from .model import available_folds, load_predictor
from .progress import Progress


def previous_stage_folder(folder: Path, previous_stage: str) -> Path:
    """TRAINER__PLANS__<previous_stage> next to the cascade stage's folder."""
    parts = folder.name.split('__')
    found = folder.parent / '__'.join([*parts[:2], previous_stage]) if len(parts) == 3 else None
    if found is None or not (found / 'plans.json').is_file():
        raise UsageError(f'this model is a cascade stage after {previous_stage}, and no {previous_stage} model folder '
                         f'is next to it ({found or folder.parent}); put that model folder there, or pass its '
                         f'segmentations with -prev_stage_predictions FOLDER')
    return found


class PreviousStage:
    """The previous stage's nnU-Net predictor, loaded on first use: its folds are the cascade's where it has them
    all, else every fold it has; device, step and mirroring are the cascade's."""

    def __init__(self, folder: Path, folds: Optional[Sequence], checkpoint: str, predictor):
        have = available_folds(folder, checkpoint)
        if not have:
            raise UsageError(f'the previous stage {folder} has no fold_N/{checkpoint}; train it, or pass its '
                             f'segmentations with -prev_stage_predictions FOLDER')
        self.folder, self.checkpoint, self.like = folder, checkpoint, predictor
        self.folds = list(folds) if folds and all(f in have for f in folds) else have
        self.predictor = None

    def segment(self, case: str, files: List[str], out: Path, progress: Progress) -> str:
        """The case's previous-stage segmentation as nnU-Net writes it (predict_single_npy_array), in `out`."""
        progress.stage('previous_stage', case, model=str(self.folder), folds=self.folds)
        if self.predictor is None:
            p = self.like
            self.predictor = load_predictor(self.folder, self.folds, self.checkpoint, p.device, p.tile_step_size,
                                            p.use_mirroring)
        rw = self.predictor.plans_manager.image_reader_writer_class()
        data, props = rw.read_images(files)
        self.predictor.predict_single_npy_array(data, props, None, str(out / case), False)
        return str(out / (case + self.predictor.dataset_json['file_ending']))
