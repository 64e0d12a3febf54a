"""The trust figures of a run (the sidecar's `evaluation` key per class) as Slicer nodes: a table of the numbers,
the deletion and insertion curves with their random baselines in a plot chart, and a pass/warn line per class for
the sanity check. MRML only, so it runs (and is tested) without the app."""
import math
from typing import List

import vtk

# (column, where in a class's evaluation, kind): kind 'number', 'text' or 'flag' (yes/no)
COLUMNS = [
    ('class', None, 'text'),
    ('deletion AUC', ('deletion_auc',), 'number'),
    ('deletion AUC, random', ('random_deletion_auc',), 'number'),
    ('deletion ratio (below 1: better than random)', ('deletion_ratio',), 'number'),
    ('insertion AUC', ('insertion_auc',), 'number'),
    ('insertion AUC, random', ('random_insertion_auc',), 'number'),
    ('insertion ratio (above 1: better than random)', ('insertion_ratio',), 'number'),
    ('sanity check', ('sanity', 'passes'), 'flag'),
    ('rank correlation, decoder randomised', ('sanity', 'spearman_after_decoder'), 'number'),
    ('rank correlation, shuffled input', ('sanity', 'data_randomisation_spearman'), 'number'),
    ('map energy in segmentation', ('mask_statistics', 'predicted', 'energy_in_mask'), 'number'),
    ('map energy in ring around it', ('mask_statistics', 'predicted', 'energy_in_ring'), 'number'),
    ('map maximum in segmentation', ('mask_statistics', 'predicted', 'pointing_game'), 'flag'),
    ('centroid distance (mm)', ('mask_statistics', 'predicted', 'centroid_distance_mm'), 'number'),
]
REFERENCE_COLUMNS = [
    ('map energy in reference', ('mask_statistics', 'reference', 'energy_in_mask'), 'number'),
    ('map maximum in reference', ('mask_statistics', 'reference', 'pointing_game'), 'flag'),
    ('centroid distance to reference (mm)', ('mask_statistics', 'reference', 'centroid_distance_mm'), 'number'),
]
CURVE_COLORS = [(0.85, 0.2, 0.2), (0.2, 0.45, 0.85), (0.2, 0.65, 0.3), (0.85, 0.55, 0.1), (0.55, 0.3, 0.75)]


def evaluations(sidecar: dict) -> dict:
    """Class name -> its evaluation, for the classes a run evaluated (or skipped)."""
    return {name: c['evaluation'] for name, c in sidecar.get('classes', {}).items() if 'evaluation' in c}


def _get(evaluation: dict, path):
    for key in path:
        if not isinstance(evaluation, dict) or key not in evaluation:
            return None
        evaluation = evaluation[key]
    return evaluation


def add_table(scene, sidecar: dict, name: str, created: list):
    """One row per class; a skipped class has only its reason (last column). New nodes go to `created`."""
    per_class = evaluations(sidecar)
    reference = any(_get(e, ('mask_statistics', 'reference')) for e in per_class.values())
    columns = COLUMNS + (REFERENCE_COLUMNS if reference else []) + [('note', ('skipped',), 'text')]
    node = scene.AddNewNodeByClass('vtkMRMLTableNode', name)
    created.append(node)
    for title, path, kind in columns:
        array = vtk.vtkDoubleArray() if kind == 'number' else vtk.vtkStringArray()
        array.SetName(title)
        for cls, e in per_class.items():
            value = cls if path is None else _get(e, path)
            if kind == 'number':
                array.InsertNextValue(math.nan if value is None else float(value))
            elif kind == 'flag':
                array.InsertNextValue('' if value is None else 'yes' if value else 'no')
            else:
                array.InsertNextValue('' if value is None else str(value))
        node.AddColumn(array)
    return node


def add_curves(scene, sidecar: dict, name: str, created: list):
    """The plot chart of the deletion and insertion curves of every evaluated class, the map's solid, the random
    rankings' mean dashed; None when no class was evaluated. New nodes (table, chart, series) go to `created`."""
    per_class = {k: e for k, e in evaluations(sidecar).items() if 'fractions' in e}
    if not per_class:
        return None
    table = scene.AddNewNodeByClass('vtkMRMLTableNode', f'{name} curves')
    created.append(table)
    fractions = next(iter(per_class.values()))['fractions']
    columns = {'fraction (%)': [100 * f for f in fractions]}
    for cls, e in per_class.items():
        for kind in ('deletion', 'insertion'):
            columns[f'{cls} {kind}'] = e[kind]
            columns[f'{cls} {kind}, random'] = e[f'random_{kind}']
    for title, values in columns.items():
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        for v in values:
            array.InsertNextValue(float(v))
        table.AddColumn(array)
    chart = scene.AddNewNodeByClass('vtkMRMLPlotChartNode', f'{name} deletion and insertion')
    created.append(chart)
    chart.SetTitle(f'{name}: deletion and insertion')
    chart.SetXAxisTitle('% of the region removed (deletion) or restored (insertion), top-ranked first')
    chart.SetYAxisTitle('mean probability in the region')
    for i, cls in enumerate(per_class):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        for kind, marker in (('deletion', 'circle'), ('insertion', 'square')):
            for random in (False, True):
                column = f'{cls} {kind}' + (', random' if random else '')
                series = scene.AddNewNodeByClass('vtkMRMLPlotSeriesNode', f'{name} {column}')
                created.append(series)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName('fraction (%)')
                series.SetYColumnName(column)
                series.SetPlotType(series.PlotTypeScatter)
                series.SetMarkerStyle(series.MarkerStyleSquare if marker == 'square' else series.MarkerStyleCircle)
                series.SetLineStyle(series.LineStyleDash if random else series.LineStyleSolid)
                series.SetColor(*(tuple(0.5 + 0.5 * c for c in color) if random else color))
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def sanity_lines(sidecar: dict) -> List[str]:
    """One line per class: the sanity check's verdict, or why the class was not evaluated."""
    lines = []
    for cls, e in evaluations(sidecar).items():
        if 'skipped' in e:
            lines.append(f'{cls}: not evaluated ({e["skipped"]})')
        elif 'sanity' in e:
            lines.append(f'{cls}: {"OK" if e["sanity"]["passes"] else "WARNING"}: the map {e["sanity"]["verdict"]}')
    return lines
