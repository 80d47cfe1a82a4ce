"""docs/config_reference.md is tools/config_reference.py's output; the parser reads comments."""
import os

import pytest

from tests.conftest import REPO

from tools import config_reference


def test_committed_reference_is_up_to_date():
    """Fails when a key is added to retina_focal/config/defaults.py without regenerating the file."""
    with open(os.path.join(REPO, "docs", "config_reference.md")) as f:
        committed = f.read()
    assert committed == config_reference.render(), "run: python tools/config_reference.py"


def test_every_added_key_has_a_row_with_its_real_default():
    text = config_reference.render()
    assert "| `MODEL.RETINA_FOCAL.LOSS.OHEM_BATCH_SIZE` | `128` |" in text
    assert "| `TEST.EVALUATOR` | `'coco'` |" in text
    assert "| `MODEL.RETINA_FOCAL.P6_FROM` | `'res5'` |" in text and "| §4, footnote 2 |" in text
    assert "`MODEL.RETINA_FOCAL.LOSS` |" not in text  # nodes have no row


SOURCE = '''
    _C.MODEL.X = CN()
    # Shared by the two keys below (§3.3).
    _C.MODEL.X.A = 1
    _C.MODEL.X.B = 2

    # Own comment,
    # on two lines.
    _C.MODEL.X.C = 3
'''


def test_comment_blocks_cover_the_keys_below_them_up_to_a_blank_line():
    assert config_reference.key_comments(SOURCE) == {
        "MODEL.X.A": "Shared by the two keys below (§3.3).",
        "MODEL.X.B": "Shared by the two keys below (§3.3).",
        "MODEL.X.C": "Own comment, on two lines.",
    }


def test_a_key_without_comment_is_named():
    with pytest.raises(ValueError, match=r"line 11: _C.MODEL.Y has no comment above it"):
        config_reference.key_comments(SOURCE + "\n    _C.MODEL.Y = 4\n")


def test_check_mode_detects_a_stale_file(tmp_path):
    stale = tmp_path / "ref.md"
    stale.write_text("old\n")
    assert config_reference.main(["--check", "--output", str(stale)]) == 1
    assert config_reference.main(["--output", str(stale)]) == 0
    assert config_reference.main(["--check", "--output", str(stale)]) == 0
