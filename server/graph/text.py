"""Text extraction (uploads -> str) and chunking (str -> overlapping chunks).

Chunking works on character offsets: ``chunk_spans`` returns ``(start, end)`` pairs such that
the first starts at 0, the last ends at ``len(text)``, every span is at most ``chunk_size`` long,
and consecutive spans overlap by at most ``chunk_overlap`` characters and never leave a gap.
So no text is lost and nothing is repeated beyond the overlap. Cut points prefer, in order,
a paragraph break, a line break, a sentence end, then any whitespace, within the last half of the
window; only text without any of these is cut mid-word.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable
import unicodedata
from pathlib import PurePosixPath

import charset_normalizer
import pypdf
from pypdf.errors import PyPdfError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 500
DEFAULT_CHUNK_OVERLAP = 50
MAX_CHUNK_SIZE = 10_000  # Zep's limit per episode, in characters
ALLOWED_EXTENSIONS = (".txt", ".md", ".markdown", ".pdf")
MAX_FILENAME_LENGTH = 255

_PDF_MAGIC = b"%PDF-"
_CP1252_MARGIN = 0.1
# Checked in order; the last match inside the search window wins for each.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n"),  # paragraph
    re.compile(r"\n"),  # line
    re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*[ \t]+|[\u3002\uff01\uff1f]"),  # sentence
    re.compile(r"\s"),  # word
)
_EXCESS_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


class TextError(ValueError):
    """Input that cannot become text or chunks; the message is safe to show to a client."""


class TextTooLarge(TextError):
    """The text (or the work to extract it) is over a limit: a 413, not a 400."""


class TextBudget:
    """Limits on extraction shared by every file of one request: characters and CPU seconds.

    ``spend`` is called as text comes (per text fragment of a PDF page, per file), so an
    expanding PDF is stopped while it expands, not after."""

    def __init__(self, max_chars: int, max_seconds: float, clock: Callable[[], float] = time.process_time) -> None:
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        self.chars = 0
        self._clock = clock
        self._deadline = clock() + max_seconds

    def spend(self, chars: int) -> None:
        self.chars += chars
        if self.chars > self.max_chars:
            raise TextTooLarge(f"the extracted text is longer than the limit of {self.max_chars} characters")
        if self._clock() > self._deadline:
            raise TextTooLarge(f"extracting the text took longer than the limit of {self.max_seconds:g} s")


# --------------------------------------------------------------------------- chunking


def validate_chunk_settings(chunk_size: object, chunk_overlap: object) -> tuple[int, int]:
    """Return ``(chunk_size, chunk_overlap)`` as ints or raise TextError with a clear message."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TextError("chunk_size must be an integer")
    if not isinstance(chunk_overlap, int) or isinstance(chunk_overlap, bool):
        raise TextError("chunk_overlap must be an integer")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise TextError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}")
    if chunk_overlap < 0:
        raise TextError("chunk_overlap must not be negative")
    if chunk_overlap >= chunk_size:
        raise TextError("chunk_overlap must be smaller than chunk_size")
    return chunk_size, chunk_overlap


def _cut_point(text: str, lo: int, hi: int) -> int:
    """Best end offset in ``(lo, hi]``: just after the last boundary found in ``text[lo:hi]``."""
    window = text[lo:hi]
    for pattern in _BOUNDARIES:
        last = None
        for last in pattern.finditer(window):
            pass
        if last is not None and lo + last.end() > lo:
            return lo + last.end()
    return hi


def chunk_spans(text: str, chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_overlap: int = DEFAULT_CHUNK_OVERLAP) -> list[tuple[int, int]]:
    """Offsets of overlapping chunks covering all of ``text`` (see the module docstring)."""
    chunk_size, chunk_overlap = validate_chunk_settings(chunk_size, chunk_overlap)
    n = len(text)
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n:
        hard_end = min(start + chunk_size, n)
        if hard_end == n:
            spans.append((start, n))
            break
        # The cut must leave room for progress after the overlap is stepped back.
        lo = start + max(chunk_overlap + 1, chunk_size // 2) - 1
        end = _cut_point(text, lo, hard_end) if lo < hard_end else hard_end
        spans.append((start, end))
        next_start = end - chunk_overlap
        if chunk_overlap:
            # Let the overlap begin at a word start when one is near (it only shrinks the overlap).
            space = re.search(r"\s", text[next_start : end - chunk_overlap // 2])
            if space is not None:
                next_start += space.end()
        start = next_start
    return spans


def split_text(text: str, chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_overlap: int = DEFAULT_CHUNK_OVERLAP) -> list[str]:
    """The chunks of ``text``; chunks that are only whitespace carry nothing and are dropped."""
    return [text[s:e] for s, e in chunk_spans(text, chunk_size, chunk_overlap) if text[s:e].strip()]


# --------------------------------------------------------------------------- extraction


def normalize_text(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no NULs; stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = _TRAILING_SPACE.sub("\n", text)
    text = _EXCESS_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def check_filename(filename: object) -> str:
    """Validate an uploaded file's name and return its lower-case extension.

    The name is only ever shown back to the client, never used as a path; still, a name with a
    directory part, a control character or an absurd length is refused rather than cleaned, so
    the client learns that its input was wrong.
    """
    if not isinstance(filename, str) or not filename.strip():
        raise TextError("every uploaded file needs a file name")
    if len(filename) > MAX_FILENAME_LENGTH:
        raise TextError(f"file name is longer than {MAX_FILENAME_LENGTH} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in filename):
        raise TextError("file name contains control characters")
    if "/" in filename or "\\" in filename or filename.strip() in (".", ".."):
        raise TextError("file name must not contain a path")
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in ALLOWED_EXTENSIONS:
        shown = suffix or "(none)"
        raise TextError(f"unsupported file type {shown}; allowed: {', '.join(ALLOWED_EXTENSIONS)}")
    return suffix


def decode_text(data: bytes) -> str:
    """Decode a text file: UTF-8 (with or without BOM) first, otherwise detect the encoding."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.debug("upload is not UTF-8; detecting its encoding", extra={"size": len(data)})
    results = charset_normalizer.from_bytes(data)
    best = results.best()
    if best is None:
        raise TextError("file is not readable text (unknown encoding or binary content)")
    # Short Western European texts are often scored a little better as Baltic or Central European
    # code pages; Windows-1252 is by far the likelier origin, so it wins when it is nearly as good.
    for match in results:
        if match.encoding == "cp1252" and match.chaos <= best.chaos + _CP1252_MARGIN:
            best = match
            break
    logger.debug("decoded non-UTF-8 text", extra={"encoding": best.encoding})
    return str(best)


def extract_pdf(data: bytes, budget: TextBudget | None = None) -> str:
    """Text of every page of a PDF; TextError when it is not a readable PDF, TextTooLarge when
    ``budget`` runs out (checked per text fragment, while each page is extracted)."""
    if not data[:1024].lstrip().startswith(_PDF_MAGIC):
        raise TextError("file is not a valid PDF")

    def visit(text: str, *_: object) -> None:
        if budget is not None:
            budget.spend(len(text))

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise TextError("PDF is encrypted")
        pages = []
        for page in reader.pages:
            if budget is not None:
                budget.spend(0)  # the time budget, between pages too
            pages.append(page.extract_text(visitor_text=visit) or "")
    except TextError:
        raise
    # pypdf signals malformed input through its own errors and, for some damage, builtin ones.
    except (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        logger.info("unreadable PDF upload", extra={"error_type": type(exc).__name__})
        raise TextError("file is not a valid PDF") from exc
    return "\n\n".join(pages)


def extract_text(filename: str, data: bytes, budget: TextBudget | None = None) -> str:
    """Normalized text of one uploaded file (name already checked by ``check_filename``)."""
    suffix = check_filename(filename)
    if suffix == ".pdf":
        raw = extract_pdf(data, budget)
    else:
        raw = decode_text(data)
        if budget is not None:
            budget.spend(len(raw))
    text = normalize_text(raw)
    if not text:
        raise TextError("file contains no text")
    return text
