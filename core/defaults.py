"""The defaults of a generation request, in one place: what a request gets for a field it leaves
out, whoever sends it (an OpenAI client through the server, ``chat_turn`` in a script, ``spl
chat``). The engine's ``SamplingParams`` defaults to greedy (temperature 0) for the code that
builds it directly; a request from a user starts from these."""

TEMPERATURE = 0.7  # OpenAI's clients expect some variety when they name no temperature

# max_tokens: no cap, the reply goes on until the session is full (a loop still ends it). This is
# the one value for it inside spl; 0 is only how a user types it (``--max-tokens 0``, ``/max 0``).
NO_CAP = None


def typed_cap(value: int | None) -> int | None:
    """The cap on tokens per reply a user typed, with 0 meaning ``NO_CAP``."""
    return value if value else NO_CAP
