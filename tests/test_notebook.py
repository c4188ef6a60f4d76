"""notebooks/quickstart.ipynb runs top to bottom (tiny settings) without an error in any cell."""

import os
import time

import pytest

from tests.helpers import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')


def test_quickstart_notebook_runs_top_to_bottom(shapes_data_dir, tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  # The kernel inherits this environment: tiny settings, the prepared dataset, the simulated CPU devices.
  for key, value in {'JAXSEG_NOTEBOOK_STEPS': '6', 'JAXSEG_NOTEBOOK_WIDTH': '4', 'JAXSEG_NOTEBOOK_DEPTH': '2',
                     'JAXSEG_NOTEBOOK_BATCH': '8', 'JAXSEG_NOTEBOOK_WORKDIR': str(tmp_path / 'wd'),
                     'JAXSEG_NOTEBOOK_DATA_DIR': shapes_data_dir}.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  start = time.perf_counter()
  # Raises CellExecutionError (naming the cell and its traceback) when any cell fails.
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  print(f'notebook ran in {time.perf_counter() - start:.0f}s')
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 3  # Curves, validation predictions, the own image.
  assert os.path.exists(tmp_path / 'wd' / 'checkpoints')
