"""The spec file model: what one ``*.sft.yaml`` may say (the contract in docs/spec-format.md).

Every model forbids unknown keys so that a typo is an error with a location, never a silent default.
TRL's and peft's settings (``training``, ``lora``) stay plain mappings, checked by the trainer's plugin.
Plugins own the other top-level keys (``data:``, ``format:``, ``generation:``, ``launcher:``) and
register their models through ``sft_spec_register_spec_sections``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(StrictModel):
    id: str = Field(description="Hub id, local directory, builtin:NAME, or a .gguf file")
    tokenizer: str | None = Field(None, description="Tokenizer id or directory; defaults to id")
    gguf_file: str | None = Field(None, description="GGUF file inside a directory or hub repo")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading; auto follows the checkpoint")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own code; refused unless the run passes --allow-remote-code")


class Message(StrictModel):
    role: str = Field(description="system, user or assistant (map other names with role_map)")
    content: str = Field(description="The turn's text")


def xfail_shorthand(value: Any) -> Any:
    """``xfail: true`` and ``xfail: "reason"`` as the mapping they stand for."""
    if value is True:
        return {"reason": "expected to fail"}
    return {"reason": value} if isinstance(value, str) else value


class XfailSpec(StrictModel):
    reason: str = Field(description="Why the spec is expected to fail, shown in reports")
    strict: bool = Field(False, description="A pass (XPASS) fails the run, as pytest's xfail_strict")


class MatrixEntry(BaseModel):
    """One variant of the spec: ``id`` plus keys deep-merged over the spec."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(description="Names the variant in test ids: name[id]")


class Spec(StrictModel):
    name: str | None = Field(None, description="Defaults to the file name without .sft.yaml")
    description: str | None = Field(None, description="Free text shown in reports")
    tags: list[str] = Field(default_factory=list, description="Selectable with -m")
    xfail: XfailSpec | None = Field(None, description="Expected to fail: a reason, or {reason, strict}")
    skip: str | None = Field(None, description="Not run; the reason is reported")
    model: ModelSpec = Field(description="The model to train: an id string, or a mapping with id")
    method: Literal["full", "lora", "qlora"] = Field("full", description="What is trained")
    lora: dict[str, Any] = Field(default_factory=dict, description="peft.LoraConfig fields (lora and qlora)")
    quantization: dict[str, Any] = Field(
        default_factory=dict, description="transformers.BitsAndBytesConfig fields for qlora (default nf4 4-bit)")
    training: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig fields")
    expect: list[dict[str, Any]] = Field(
        default_factory=list, description="Prompts and checks on the answers; a spec needs expect, checks, or both")
    checks: dict[str, Any] = Field(default_factory=dict, description="Training-level checks, e.g. final_loss_below")
    matrix: list[MatrixEntry] = Field(default_factory=list, description="Variants, each deep-merged over the spec")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("xfail", mode="before")
    @classmethod
    def _xfail_shorthand(cls, value: Any) -> Any:
        return xfail_shorthand(value)

    @field_validator("skip", mode="before")
    @classmethod
    def _skip_shorthand(cls, value: Any) -> Any:
        if value is True:
            return "skipped by the spec"
        return None if value is False else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_shorthand(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value
