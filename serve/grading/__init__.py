"""The grading core: CEFR levels, the prompt, audio rules, score arithmetic, config, parts and adapter files.

Pure Python and numpy (no vLLM, Ray or web framework): the engine, the
service, training and evaluation all build on it.
"""
