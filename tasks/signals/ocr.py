"""OCR: how much of the image is text, what the text says, and the caption with that text added.

Kolors drops images dominated by text and puts the text an image shows into its caption, so a
model learns to draw the words it is asked for. Detection (PP-OCRv6 DB, ONNX, in the rapidocr
wheel) costs ~0.8-1 s per megapixel of *detector input* on one core, so it runs at a reduced short
side (``det_side``, 256 px: ~0.1 MP, ~25 ms whatever the photo's size; 320 px cost twice that and
changed no area by more than 0.015 on the bench's text images, 224 px lost a line). Both models run
with denormal floats flushed to zero (``tasks.fpu``): on Intel cores the detector took 89 ms
without, for the same boxes. Recognition costs ~20-25 ms per line, runs only on detected boxes, and
cuts them from a larger view (``rec_side``): 320 px is too coarse to read small print.

The detector alone is not trusted: on a photo of two cats it paints one box over the whole
image, on a coffee cup one box read as "8" at low confidence. So one floor, ``min_confidence``,
decides which boxes count, and every column derives from those same boxes: a box is in
``ocr_area_ratio`` and ``ocr_boxes`` exactly when its line is in ``ocr_text``, ``ocr_confidence`` and
``caption_ocr``, so a photo is never rejected on area for text its caption does not report. A box
the floor drops, or that is not read (beyond ``max_lines``, or a line too long to read),
contributes nothing. With ``recognize: false`` there is
no text to agree with: boxes over ``verify_box_area`` of the image are read, to check them against
the same floor, and the smaller ones count unread.

``ocr_area_ratio`` is the *union* of the kept boxes over the image area (rasterised, so overlaps
count once; DB's boxes are expanded quadrilaterals, a little larger than the glyphs).
Extreme shapes: the image is capped at ``MAX_SIDE`` on its long side, since OpenCV's warps (the
recognition crops) assert every side is below 32767; a box longer than ``MAX_LINE_RATIO`` times its
height is not read (the recogniser pads each line of a batch to a 48 px high strip of the batch's
widest ratio: hundreds of MB for a hair-thin line) and so does not count as text. Beyond ~56:1 (at
the default ``det_max_side``) the detector rounds the short side down to 0 and finds no boxes.
Models load from explicit paths inside the installed wheel; nothing is ever downloaded.
The optional PaddleOCR backend needs the paddleocr package and local models in
``paddle_model_dir``; without them it fails at once with a message naming that setting.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from tasks.fpu import flush_denormals
from tasks.signals.arrays import fit_long_side, fit_short_side
from tasks.signals.base import ModelParams, ModelSignal, Ranges, Sample

_DET_MODEL = "PP-OCRv6_det_small.onnx"
_REC_MODEL = "PP-OCRv6_rec_small.onnx"
# Long side cap: a rotated crop spans at most the diagonal, 11.6k px, well under SHRT_MAX; at the
# default rec_side (640) only images beyond 12.8:1 shrink, and an input stays under 16 MB.
MAX_SIDE = 8192
# 200:1 is ~400 characters on one line, 9600 px wide at the recogniser's 48 px height.
MAX_LINE_RATIO = 200
# The recogniser shrinks every line to 48 px high; a taller crop (big print, or the detector's
# whole-photo false box) is cut at twice that, not at full size: cutting a 640 px crop cost
# ~6 ms of the warp alone, and the resize after it threw those pixels away.
MAX_LINE_PX = 96


class OcrParams(ModelParams):
    backend: Literal["rapidocr", "paddleocr"] = "rapidocr"
    paddle_model_dir: str | None = Field(
        None, description="backend paddleocr: a directory with PaddleOCR 3.x inference models in det/ and rec/"
    )
    det_side: int = Field(256, ge=32, le=4096, description="short side text detection runs at")
    det_max_side: int = Field(960, ge=32, le=8192, description="cap on the long side at detection (panoramas)")
    min_box_score: float = Field(0.5, ge=0, le=1, description="mean text probability inside a box to keep it")
    recognize: bool = Field(True, description="read the text (ocr_text, caption_ocr); False: boxes and area only")
    rec_side: int = Field(640, ge=32, le=4096, description="short side of the view text lines are cut from")
    min_confidence: float = Field(
        0.8, ge=0, le=1, description="recognition confidence for a box to count: in the area, the text and caption_ocr"
    )
    max_lines: int = Field(32, ge=1, description="read at most this many boxes, the largest; the rest do not count")
    verify_box_area: float = Field(
        0.05, ge=0, le=1, description="recognize=False: boxes above this share of the image are still read, to check"
    )
    threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per actor (1 measured fastest per core)")

    @model_validator(mode="before")
    @classmethod
    def _one_floor(cls, data: Any) -> Any:
        """The two floors this replaced are refused by name, so an old config says what to set
        instead rather than only that the key is unknown."""
        old = sorted({"min_text_score", "caption_min_score"} & set(data)) if isinstance(data, dict) else []
        if old:
            raise ValueError(f"{', '.join(old)}: replaced by min_confidence, the one floor every OCR column uses")
        return data


def _rapidocr_dir() -> Path | None:
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def crop_line(bgr: np.ndarray, box: np.ndarray, max_height: int = MAX_LINE_PX) -> np.ndarray:
    """The text line in quadrilateral ``box`` cut out straight (perspective warp, cubic), turned
    upright when it stands (height >= 1.5 x width, as PP-OCR's pipeline does), and scaled so the
    line's height is at most ``max_height``."""
    width = max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3]))
    height = max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))
    w, h = int(width), int(height)
    standing = w > 0 and h / w >= 1.5
    line_height = w if standing else h
    scale = min(1.0, max_height / line_height) if line_height > 0 else 1.0
    out_w, out_h = max(1, int(w * scale)), max(1, int(h * scale))
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], np.float32)
    warp = cv2.getPerspectiveTransform(box.astype(np.float32), target)
    crop = cv2.warpPerspective(bgr, warp, (out_w, out_h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(crop) if standing else crop


def det_input(rgb: np.ndarray, limit_side_len: int) -> np.ndarray | None:
    """rapidocr's ``DetPreProcess`` (limit type "max"), the same float32 tensor, from RGB (BGR out,
    as the model takes). Its normalisation runs through float64 temporaries, 2 ms of a 0.1 MP
    view; here in place in float32: (x / 255 - 0.5) / 0.5 and x / 255 * 2 - 1 round once either way."""
    h, w = rgb.shape[:2]
    ratio = 1.0
    if max(h, w) > limit_side_len:
        ratio = float(limit_side_len) / h if h > w else float(limit_side_len) / w
    resize_h, resize_w = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
    if resize_w <= 0 or resize_h <= 0:
        return None
    x = cv2.resize(rgb, (resize_w, resize_h)).astype(np.float32)
    x *= np.float32(1 / 255.0)
    x *= 2
    x -= 1
    return np.ascontiguousarray(x[:, :, ::-1].transpose(2, 0, 1))[None]


def union_area_ratio(boxes: list[np.ndarray], height: int, width: int) -> float:
    """Fraction of the image covered by at least one box (polygons in pixel coordinates)."""
    if not boxes or height < 1 or width < 1:
        return 0.0
    mask = np.zeros((height, width), np.uint8)
    for box in boxes:  # one call per box: a single fillPoly would fill the overlaps even-odd, i.e. not at all
        cv2.fillPoly(mask, [np.round(box).astype(np.int32).reshape(-1, 1, 2)], 1)
    return min(float(mask.mean()), 1.0)


Line = tuple[str, float]  # what the recogniser read in a box, and its confidence


def confident(boxes: list[np.ndarray], lines: list[Line], floor: float) -> tuple[list[np.ndarray], list[Line]]:
    """The boxes that count and their lines, still paired: those read as text at or above
    ``floor``. Every column derives from what this keeps, so the area never counts a box the text
    and caption leave out."""
    kept = [i for i, (text, score) in enumerate(lines) if text and score >= floor]
    return [boxes[i] for i in kept], [lines[i] for i in kept]


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def caption_with_text(caption: str | None, text: str) -> str | None:
    """``a bus. The image shows the text "TOKYO 123"``; a Chinese caption gets the Chinese form
    ``一张海报。图中文字：“新年快乐”``, so a caption stays in one language. The caption comes back
    unchanged when there is no text."""
    if not text:
        return caption
    head = (caption or "").strip()
    if _CJK.search(head):
        head += "" if head[-1] in "。！？.!?" else "。"
        return f"{head}图中文字：“{text}”"
    if head and head[-1] not in ".!?。！？":
        head += "."
    quoted = text.replace('"', "'")
    return f'{head} The image shows the text "{quoted}"'.strip()


class Ocr(ModelSignal):
    name = "ocr"
    cost = 200
    Params = OcrParams
    fields = (
        pa.field("ocr_area_ratio", pa.float32()),
        pa.field("ocr_boxes", pa.int32()),
        pa.field("ocr_text", pa.string()),
        pa.field("ocr_confidence", pa.float32()),
        pa.field("caption_ocr", pa.string()),
    )
    # Text columns take no rule; the area is a union over the image, the confidence a mean of
    # recogniser probabilities.
    ranges: ClassVar[Ranges] = {"ocr_area_ratio": (0, 1), "ocr_boxes": (0, None), "ocr_confidence": (0, 1)}

    crop = staticmethod(crop_line)  # how a line is cut for the recogniser (the bench swaps in the previous)
    # Around each model call: the detector's GELU makes denormals, 3.7x its time on Intel cores
    # (tasks/fpu.py); the bench's previous version runs without.
    numerics = staticmethod(flush_denormals)

    def pixel_side(self) -> int | None:
        p = self.params
        return max(p.det_side, p.rec_side) if p.recognize else p.det_side

    def unavailable(self) -> str | None:
        p = self.params
        if p.backend == "paddleocr":
            problems = []
            if importlib.util.find_spec("paddleocr") is None:
                problems.append("the paddleocr package is not installed")
            if not p.paddle_model_dir:
                problems.append("paddle_model_dir is not set")
            elif not all((Path(p.paddle_model_dir) / d).is_dir() for d in ("det", "rec")):
                problems.append(f"paddle_model_dir {p.paddle_model_dir!r} has no det/ and rec/ model directories")
            if problems:
                return (
                    f"ocr backend paddleocr: {'; '.join(problems)}. It needs paddleocr installed and "
                    "signals.ocr.paddle_model_dir set to a local directory with PaddleOCR 3.x inference models "
                    "in det/ and rec/ (nothing is downloaded), or use backend: rapidocr"
                )
            return None
        root = _rapidocr_dir()
        if root is None:
            return "ocr needs rapidocr==3.10.0 (its wheel ships the PP-OCRv6 ONNX models)"
        missing = [m for m in (_DET_MODEL, _REC_MODEL) if not (root / "models" / m).is_file()]
        return f"ocr: model(s) missing from the rapidocr wheel: {', '.join(missing)}" if missing else None

    def model_files(self) -> list[Path]:
        if self.params.backend == "paddleocr":
            root = Path(self.params.paddle_model_dir or "")
            return sorted(f for d in ("det", "rec") for f in (root / d).rglob("*") if f.is_file())
        root = _rapidocr_dir()
        return [root / "models" / _DET_MODEL, root / "models" / _REC_MODEL] if root else []

    def prepare(self, sample: Sample) -> tuple[np.ndarray, str | None]:
        rgb = sample.image.pixel_array(self.pixel_side())
        return np.ascontiguousarray(fit_long_side(rgb, MAX_SIDE)), sample.caption

    def setup(self) -> None:
        problem = self.unavailable()
        if problem:
            raise RuntimeError(problem)
        if self.params.backend == "paddleocr":
            self._setup_paddle()
        else:
            self._setup_rapidocr()

    def _setup_rapidocr(self) -> None:
        from rapidocr.ch_ppocr_det import TextDetector
        from rapidocr.ch_ppocr_rec import TextRecognizer
        from rapidocr.utils.parse_parameters import ParseParams

        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        root, p = _rapidocr_dir(), self.params
        cfg = ParseParams.load(root / "config.yaml")
        engine = cfg.EngineConfig.onnxruntime
        engine.intra_op_num_threads, engine.inter_op_num_threads = p.threads, 1
        # rapidocr turns onnxruntime's memory arena off; on, an actor reuses its buffers across
        # images: 15 % less core time per image (bench, det 256), memory bounded by the largest input.
        engine.enable_cpu_mem_arena = True
        cfg.Det.update(engine_cfg=engine, model_path=str(root / "models" / _DET_MODEL))
        cfg.Det.update(limit_type="max", limit_side_len=p.det_max_side, box_thresh=p.min_box_score)
        self._det = TextDetector(cfg.Det)
        cfg.Rec.update(engine_cfg=engine, model_path=str(root / "models" / _REC_MODEL), font_path=None)
        self._rec = TextRecognizer(cfg.Rec)  # the character list is in the ONNX metadata: no dictionary download

    def _setup_paddle(self) -> None:
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")  # no network probe at import
        from paddleocr import PaddleOCR

        root, p = Path(self.params.paddle_model_dir or ""), self.params
        self._paddle = PaddleOCR(
            text_detection_model_dir=str(root / "det"),
            text_recognition_model_dir=str(root / "rec"),
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            text_det_limit_type="max",
            text_det_limit_side_len=p.det_max_side,
            text_det_box_thresh=p.min_box_score,
        )

    def _detect(self, rgb: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The detection view and its text boxes (quadrilaterals in its pixels): rapidocr's
        ``TextDetector`` step by step, with ``det_input`` for its preprocessing."""
        view = fit_short_side(rgb, self.params.det_side)
        x = det_input(view, self.params.det_max_side)
        if x is None:
            return view, []
        with self.numerics():
            prob = self._det.session(x)
        boxes, _ = self._det.postprocess_op(prob, view.shape[:2])
        return view, [] if len(boxes) < 1 else list(self._det.sorted_boxes(boxes))

    def _to_read(self, boxes: list[np.ndarray], area: float) -> list[int]:
        """Which boxes to recognise: all (the largest ``max_lines``) when reading, else only the
        big ones, to check them: the detector paints a whole-image box over a photo of two cats."""
        p = self.params
        areas = [cv2.contourArea(b.astype(np.float32)) for b in boxes]
        if p.recognize:
            return sorted(sorted(range(len(boxes)), key=lambda i: -areas[i])[: p.max_lines])
        return [i for i, a in enumerate(areas) if a >= p.verify_box_area * area]

    def _recognise(self, rgb: np.ndarray, view: np.ndarray, boxes: list[np.ndarray]) -> list[Line]:
        from rapidocr.ch_ppocr_rec import TextRecInput

        if not boxes:
            return []
        scale = np.array([rgb.shape[1] / view.shape[1], rgb.shape[0] / view.shape[0]], np.float32)
        bgr = rgb[:, :, ::-1]  # crops come from the larger view: the detection view is too coarse to read
        crops = [self.crop(bgr, (b * scale).astype(np.float32)) for b in boxes]
        lines = [i for i, c in enumerate(crops) if max(c.shape[:2]) <= MAX_LINE_RATIO * max(1, min(c.shape[:2]))]
        read: list[Line] = [("", 0.0)] * len(crops)
        if lines:
            with self.numerics():
                out = self._rec(TextRecInput(img=[crops[i] for i in lines]))
            for i, t, s in zip(lines, out.txts, out.scores, strict=True):
                read[i] = (str(t).strip(), float(s))
        return read

    def _read(self, rgb: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[Line]]:
        """The detection view, the boxes that count and, when reading, their lines (one per box,
        in reading order). Only ``confident`` decides what counts, for both backends."""
        floor = self.params.min_confidence
        if self.params.backend == "paddleocr":
            view = rgb  # PaddleOCR resizes for detection itself (det_max_side) and reads from this view
            with self.numerics():
                res = next(iter(self._paddle.predict(np.ascontiguousarray(view[:, :, ::-1]))))
            lines = [(str(t).strip(), float(s)) for t, s in zip(res["rec_texts"], res["rec_scores"], strict=True)]
            boxes = [np.asarray(b, np.float32) for b in res["rec_polys"]]
            return view, *confident(boxes, lines, floor)
        view, boxes = self._detect(rgb)
        chosen = self._to_read(boxes, view.shape[0] * view.shape[1])
        read = [boxes[i] for i in chosen]
        kept, lines = confident(read, self._recognise(rgb, view, read), floor)
        if self.params.recognize:
            return view, kept, lines
        checked = set(chosen)
        unread = [b for i, b in enumerate(boxes) if i not in checked]  # small boxes, not worth checking
        return view, unread + kept, []

    def infer(self, inputs: list[tuple[np.ndarray, str | None]]) -> list[dict[str, Any]]:
        out = []
        for rgb, caption in inputs:
            view, boxes, lines = self._read(fit_long_side(rgb, MAX_SIDE))  # a no-op after prepare
            row: dict[str, Any] = {
                "ocr_area_ratio": union_area_ratio(boxes, *view.shape[:2]),
                "ocr_boxes": len(boxes),
                "ocr_text": None,
                "ocr_confidence": None,
                "caption_ocr": caption,
            }
            if self.params.recognize:  # the same lines as the boxes above: no second floor here
                text = " ".join(t for t, _ in lines)
                row["ocr_text"] = text
                row["ocr_confidence"] = sum(s for _, s in lines) / len(lines) if lines else None
                row["caption_ocr"] = caption_with_text(caption, text)
            out.append(row)
        return out


SIGNAL = Ocr
