"""The base of every typed config block: unknown keys are errors, values are immutable once validated."""
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
