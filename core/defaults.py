"""The defaults of a generation request, in one place: what a request gets for a field it leaves
out, whoever sends it (an OpenAI client through the server, ``chat_turn`` in a script, ``spl
chat``). The engine's ``SamplingParams`` defaults to greedy (temperature 0) for the code that
builds it directly; a request from a user starts from these."""

TEMPERATURE = 0.7  # OpenAI's clients expect some variety when they name no temperature
