"""Reading the model of a multipart form from its first bytes."""

from __future__ import annotations

from llm_proxy.proxy.multipart import form_boundary, model_from_form

FORM = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="model"\r\n'
    b"Content-Type: audio/wav\r\n\r\n"
    b"RIFF....\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="model"\r\n\r\n'
    b"whisper-1\r\n"
    b"--XyZ--\r\n"
)


def test_boundary_is_read_plain_or_quoted() -> None:
    assert form_boundary("multipart/form-data; boundary=XyZ") == b"XyZ"
    assert form_boundary('Multipart/Form-Data; boundary="a b"; x=1') == b"a b"
    assert form_boundary("application/json") is None
    assert form_boundary("multipart/form-data") is None
    assert form_boundary(None) is None


def test_the_model_field_is_found_and_a_file_named_model_is_not() -> None:
    assert model_from_form(FORM, b"XyZ") == "whisper-1"


def test_a_model_field_cut_by_the_head_is_not_guessed() -> None:
    cut = FORM[: FORM.index(b"whisper-1") + 4]
    assert model_from_form(cut, b"XyZ") is None
    assert model_from_form(b"no form here", b"XyZ") is None
