"""Generation: answering prompts with a (steered) model on one of several engines.

- :mod:`.sampling`: :func:`generate` and :class:`SamplingConfig`, what every caller uses;
- :mod:`.engines`: :data:`ENGINES` and :func:`choose_engine`;
- :mod:`.decoding`: the random streams and token choice shared by the in-house engines;
- backends: :mod:`.torch_engine` (simsteer's continuous-batching engine and key/value
  store), :mod:`.llamacpp` (llama.cpp, additive policies as a control vector) and
  :mod:`.vllm_engine` (vLLM, every residual-stream steering, in its compiled graph).
"""

from .engines import ENGINES, choose_engine
from .sampling import Generation, SamplingConfig, generate

__all__ = ["ENGINES", "Generation", "SamplingConfig", "choose_engine", "generate"]
