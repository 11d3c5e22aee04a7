"""The operating threshold stored with a model, so evaluation and serving use the same one.

`CHECKPOINT/threshold.json` holds {"pixel": float|None, "image": float|None, "split": str,
"criterion": "max_dice"|"flag_rate", "flag_rate": float|None, "metrics": {...}}: `pixel`
binarises anomaly maps, `image` flags a scan/slice by its score. Optional fields say how the
threshold was chosen, so a consumer can check it applies: "postprocess" (the
`raymed.evaluation.postprocess.PostProcessing` settings the maps had) and "image_score" (the
`raymed.evaluation.detection.ImageScore` that turns a slice's map into its score), "source".
"""

from __future__ import annotations

import json

from raymed.data.io import exists, join, read_bytes, write_bytes_atomic
from raymed.errors import DataError

THRESHOLD_FILE = "threshold.json"


def save_threshold(checkpoint_uri: str, threshold: dict) -> str:
    """Write the threshold next to the checkpoint's weights; returns its URI."""
    unknown = set(threshold) - {"pixel", "image", "split", "criterion", "flag_rate", "metrics",
                                "postprocess", "image_score", "source"}
    if unknown:
        raise DataError(f"threshold has unknown fields: {', '.join(sorted(unknown))}")
    uri = join(checkpoint_uri, THRESHOLD_FILE)
    write_bytes_atomic(uri, json.dumps(threshold, indent=2, default=float).encode())
    return uri


def load_threshold(checkpoint_uri: str) -> dict | None:
    """The stored threshold, or None when none was chosen yet."""
    uri = join(checkpoint_uri, THRESHOLD_FILE)
    if not exists(uri):
        return None
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as err:
        raise DataError(f"{uri}: not valid JSON ({err})") from None
