"""Faces: how many, and how much of the frame the largest one fills (BlazeFace via MediaPipe).

Data-Juicer counts faces with OpenCV's Haar cascade at full resolution: ~0.6 s per photo on one
core (26 ms at 200 px, 2 s at 3 MP). BlazeFace, whose two TFLite models ship inside the mediapipe
wheel (nothing is downloaded), takes ~5 ms for both models at a 384 px short side and agrees with
Data-Juicer's expectations on its own test photos, with or without resizing (256-1024 px).

Both models run by default because each misses what the other finds: the short-range model
(128 px input, faces within ~2 m) finds a face that fills the frame, which the full-range model
misses; the full-range model (192 px, sparse) finds smaller faces, in groups, that the short-range
one misses. The short-range model also scores animal faces and clouds at 0.5-0.67 (real faces
scored 0.84-0.97 on the test photos), hence its higher threshold. Overlapping boxes from the two
models are one face. mediapipe 0.10.21 ignores ``min_detection_confidence`` (its graphs keep a
fixed 0.5), so the thresholds are applied here and cannot go below 0.5.

Both detectors letterbox the whole frame into their 128/192 px input, so the pixels beyond that
only feed the resize. The image handed to them is capped at ``MAX_SIDE`` on its long side:
OpenCV inside mediapipe asserts every side is below 32767 (SHRT_MAX) and, failing on a C++
thread, aborts the whole process (a 40000x400 banner killed the actor, then the pool). The
ratio of the largest face is relative, so it survives the scaling; tiny images (1x1, 3x3000)
simply hold no face (0, 0.0).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.signals import arrays
from tasks.signals.base import ModelParams, ModelSignal, Ranges, Sample

_MODELS = {"short": "face_detection_short_range.tflite", "full": "face_detection_full_range_sparse.tflite"}
_SELECTION = {"short": 0, "full": 1}  # mediapipe's model_selection
# 8x under SHRT_MAX; at the default 384 px short side it leaves every image up to 10.7:1 as it
# was, and beyond that a face is < 192 * 384 / 4096 = 18 px in the detector's input anyway.
MAX_SIDE = 4096


def fit_long_side(rgb: np.ndarray, limit: int = MAX_SIDE) -> np.ndarray:
    """``rgb`` with its long side at most ``limit`` (the detector's cap by default)."""
    return arrays.fit_long_side(rgb, limit)


class FacesParams(ModelParams):
    model: Literal["short", "full", "both"] = "both"
    short_min_confidence: float = Field(0.75, ge=0.5, le=1, description="threshold of the short-range model")
    full_min_confidence: float = Field(0.5, ge=0.5, le=1, description="threshold of the full-range model")
    side: int = Field(384, ge=64, le=4096, description="short side the image is detected at")
    same_face_overlap: float = Field(
        0.5, gt=0, le=1, description="intersection / smaller box area above which two boxes are one face"
    )


def _model_dir() -> Path | None:
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "modules" / "face_detection"


def merge_boxes(boxes: list[tuple[float, float, float, float, float]], overlap: float) -> list[tuple[float, ...]]:
    """Greedy NMS on (x0, y0, x1, y1, score), overlap measured against the smaller box: a tight
    box inside a loose one (the two models frame faces differently) is the same face."""
    kept: list[tuple[float, ...]] = []
    for box in sorted(boxes, key=lambda b: -b[4]):
        area = (box[2] - box[0]) * (box[3] - box[1])
        for k in kept:
            iw = min(box[2], k[2]) - max(box[0], k[0])
            ih = min(box[3], k[3]) - max(box[1], k[1])
            smaller = min(area, (k[2] - k[0]) * (k[3] - k[1]))
            if iw > 0 and ih > 0 and smaller > 0 and iw * ih / smaller >= overlap:
                break
        else:
            kept.append(box)
    return kept


class Faces(ModelSignal):
    name = "faces"
    cost = 100
    Params = FacesParams
    fields = (pa.field("face_count", pa.int32()), pa.field("face_area_ratio", pa.float32()))
    ranges: ClassVar[Ranges] = {"face_count": (0, None), "face_area_ratio": (0, 1)}  # boxes are clipped to the frame

    def _models(self) -> list[str]:
        return ["short", "full"] if self.params.model == "both" else [self.params.model]

    def pixel_side(self) -> int | None:
        return self.params.side

    def unavailable(self) -> str | None:
        root = _model_dir()
        if root is None:
            return "faces needs mediapipe==0.10.21 (its wheel ships the BlazeFace models)"
        missing = [_MODELS[m] for m in self._models() if not (root / _MODELS[m]).is_file()]
        return f"faces: BlazeFace model(s) missing from the mediapipe wheel: {', '.join(missing)}" if missing else None

    def model_files(self) -> list[Path]:
        root = _model_dir()
        return [root / _MODELS[m] for m in self._models()] if root else []

    def prepare(self, sample: Sample) -> np.ndarray:
        """Capped here (detect caps again), so a 40000x400 banner does not reach the actor as 44 MB."""
        return np.ascontiguousarray(fit_long_side(sample.image.pixel_array(self.params.side)))

    def setup(self) -> None:
        problem = self.unavailable()
        if problem:
            raise RuntimeError(problem)
        from mediapipe.python.solutions import face_detection  # slow import: actors only

        thresholds = {"short": self.params.short_min_confidence, "full": self.params.full_min_confidence}
        self._detectors = [
            (face_detection.FaceDetection(model_selection=_SELECTION[m]), thresholds[m]) for m in self._models()
        ]

    def detect(self, rgb: np.ndarray) -> list[tuple[float, ...]]:
        """Face boxes as (x0, y0, x1, y1, score), relative to the image and clipped to it."""
        boxes = []
        rgb = np.ascontiguousarray(fit_long_side(rgb))  # a no-op after prepare; infer may be fed directly
        for detector, threshold in self._detectors:
            for det in detector.process(rgb).detections or []:
                if det.score[0] < threshold:
                    continue
                b = det.location_data.relative_bounding_box
                x0, y0 = max(b.xmin, 0.0), max(b.ymin, 0.0)
                x1, y1 = min(b.xmin + b.width, 1.0), min(b.ymin + b.height, 1.0)
                if x1 > x0 and y1 > y0:
                    boxes.append((x0, y0, x1, y1, float(det.score[0])))
        return merge_boxes(boxes, self.params.same_face_overlap)

    def infer(self, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
        out = []
        for rgb in inputs:
            boxes = self.detect(rgb)
            largest = max(((b[2] - b[0]) * (b[3] - b[1]) for b in boxes), default=0.0)
            out.append({"face_count": len(boxes), "face_area_ratio": float(largest)})
        return out


SIGNAL = Faces
