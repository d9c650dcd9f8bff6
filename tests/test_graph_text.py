"""Chunking (property tests) and text extraction for uploads."""

from __future__ import annotations

import pytest
from graph_helpers import make_pdf
from hypothesis import given, settings
from hypothesis import strategies as st

from server.graph.text import (
    MAX_CHUNK_SIZE,
    TextError,
    check_filename,
    chunk_spans,
    decode_text,
    extract_pdf,
    extract_text,
    normalize_text,
    split_text,
    validate_chunk_settings,
)

# Text with the boundaries chunking cares about: words, sentence ends, line and paragraph breaks.
_pieces = st.sampled_from(["alpha", "Beta", "gamma", "δέλτα", "数据", " ", " ", ". ", "! ", "? ", "\n", "\n\n", "x" * 30, "。"])
texts = st.lists(_pieces, max_size=120).map("".join) | st.text(max_size=400)


@st.composite
def chunk_settings(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(min_value=1, max_value=120))
    overlap = draw(st.integers(min_value=0, max_value=size - 1))
    return size, overlap


@settings(max_examples=300, deadline=None)
@given(text=texts, params=chunk_settings())
def test_spans_cover_the_text_without_gaps_or_excess_overlap(text: str, params: tuple[int, int]) -> None:
    size, overlap = params
    spans = chunk_spans(text, size, overlap)
    if not text:
        assert spans == []
        return
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    for start, end in spans:
        assert 0 < end - start <= size
    for (s1, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
        assert s2 > s1 and e2 > e1  # progress
        assert s2 <= e1  # no gap: nothing lost
        assert e1 - s2 <= overlap  # nothing repeated beyond the overlap
    # Rebuilding from the spans, dropping each chunk's overlap with the previous, gives the text.
    rebuilt = text[spans[0][0] : spans[0][1]]
    for (_, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
        rebuilt += text[e1:e2]
    assert rebuilt == text


@settings(max_examples=200, deadline=None)
@given(text=texts, params=chunk_settings())
def test_split_text_drops_only_whitespace_chunks(text: str, params: tuple[int, int]) -> None:
    size, overlap = params
    chunks = split_text(text, size, overlap)
    spans = chunk_spans(text, size, overlap)
    assert chunks == [text[s:e] for s, e in spans if text[s:e].strip()]
    assert all(len(c) <= size and c.strip() for c in chunks)
    # Every non-whitespace character of the text is in some chunk.
    covered = set()
    for s, e in spans:
        if text[s:e].strip():
            covered.update(range(s, e))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_cuts_prefer_paragraphs_then_sentences() -> None:
    para1 = "First paragraph has one sentence. And a second one here."
    para2 = "Second paragraph is short."
    text = f"{para1}\n\n{para2}"
    chunks = split_text(text, chunk_size=70, chunk_overlap=0)
    assert chunks[0] == para1 + "\n\n"
    assert chunks[1] == para2

    sentences = "One sentence ends here. Another sentence follows it. A third"
    first, second, *_ = split_text(sentences, chunk_size=40, chunk_overlap=0)
    assert first == "One sentence ends here. "
    assert second.startswith("Another sentence")


def test_overlap_repeats_the_end_of_the_previous_chunk() -> None:
    text = " ".join(f"word{i}" for i in range(200))
    chunks = split_text(text, chunk_size=100, chunk_overlap=20)
    spans = chunk_spans(text, 100, 20)
    assert len(chunks) > 5
    for (s1, e1), (s2, _) in zip(spans, spans[1:], strict=False):
        assert 0 < e1 - s2 <= 20  # some real overlap, within the limit
        assert text[s2 - 1] == " "  # the overlap starts at a word


def test_defaults_are_500_and_50() -> None:
    text = "lorem ipsum " * 400
    spans = chunk_spans(text)
    assert max(e - s for s, e in spans) <= 500
    assert all(e1 - s2 <= 50 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [
        (0, 0, "chunk_size must be between 1 and 10000"),
        (MAX_CHUNK_SIZE + 1, 0, "chunk_size must be between 1 and 10000"),
        (100, 100, "chunk_overlap must be smaller than chunk_size"),
        (100, 150, "chunk_overlap must be smaller than chunk_size"),
        (100, -1, "chunk_overlap must not be negative"),
        ("500", 50, "chunk_size must be an integer"),
        (500.0, 50, "chunk_size must be an integer"),
        (True, 0, "chunk_size must be an integer"),
        (500, None, "chunk_overlap must be an integer"),
    ],
)
def test_chunk_settings_are_validated(size: object, overlap: object, message: str) -> None:
    with pytest.raises(TextError) as info:
        validate_chunk_settings(size, overlap)
    assert str(info.value) == message
    with pytest.raises(TextError):
        chunk_spans("some text", size, overlap)  # type: ignore[arg-type]


def test_chunk_settings_accept_the_limits() -> None:
    assert validate_chunk_settings(MAX_CHUNK_SIZE, MAX_CHUNK_SIZE - 1) == (MAX_CHUNK_SIZE, MAX_CHUNK_SIZE - 1)
    assert validate_chunk_settings(1, 0) == (1, 0)


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("Grüße aus Köln".encode(), "Grüße aus Köln"),
        ("\ufeffwith a BOM".encode(), "with a BOM"),
        ("Café déjà vu, naïve façade, crème brûlée: à côté de l'hôtel.".encode("cp1252"), "Café déjà vu, naïve façade, crème brûlée: à côté de l'hôtel."),
        ("Привет, это текст на русском языке для проверки кодировки.".encode("cp1251"), "Привет, это текст на русском языке для проверки кодировки."),
        ("Unicode in UTF-16 with its BOM".encode("utf-16"), "Unicode in UTF-16 with its BOM"),
        ("知识图谱构建任务的进度报告，中文文本使用国标编码保存。".encode("gb18030"), "知识图谱构建任务的进度报告，中文文本使用国标编码保存。"),
    ],
)
def test_text_in_other_encodings_is_decoded(data: bytes, expected: str) -> None:
    assert decode_text(data) == expected


def test_binary_junk_is_refused_not_crashed_on() -> None:
    junk = bytes(range(256)) * 8
    with pytest.raises(TextError, match="not readable text"):
        decode_text(junk)


def test_extract_text_normalises_newlines_and_blank_lines() -> None:
    assert extract_text("notes.md", b"# Title\r\n\r\n\r\n\r\nBody  \r\nend\n") == "# Title\n\nBody\nend"
    assert normalize_text("a\x00b\r\n") == "ab"


def test_empty_file_is_refused() -> None:
    with pytest.raises(TextError, match="no text"):
        extract_text("empty.txt", b"  \n\n ")


def test_pdf_text_is_extracted() -> None:
    pdf = make_pdf(["Marie Curie worked in Paris.", "She won two Nobel prizes."])
    assert extract_text("paper.PDF", pdf) == "Marie Curie worked in Paris.\nShe won two Nobel prizes."


@pytest.mark.parametrize(
    "data",
    [
        b"this is plain text pretending to be a PDF",
        b"%PDF-1.4\n garbage without any objects",
        make_pdf(["cut short"])[:120],
    ],
)
def test_something_that_is_not_a_pdf_is_refused(data: bytes) -> None:
    with pytest.raises(TextError, match="not a valid PDF"):
        extract_pdf(data)


@pytest.mark.parametrize("name", ["a.txt", "notes.MD", "readme.markdown", "paper.pdf", "résumé 2026.txt", "x" * 251 + ".txt"])
def test_good_file_names(name: str) -> None:
    assert check_filename(name) in (".txt", ".md", ".markdown", ".pdf")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../../x.txt", "must not contain a path"),
        ("..\\x.txt", "must not contain a path"),
        ("/etc/passwd.txt", "must not contain a path"),
        ("a\x00b.txt", "control characters"),
        ("a\nb.txt", "control characters"),
        ("x" * 300 + ".txt", "longer than 255"),
        ("virus.exe", "unsupported file type .exe"),
        ("archive.txt.exe", "unsupported file type .exe"),
        ("noext", "unsupported file type (none)"),
        ("", "needs a file name"),
        (None, "needs a file name"),
    ],
)
def test_bad_file_names(name: object, message: str) -> None:
    with pytest.raises(TextError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_filename(name)
