"""Serving side of the L2 oral proficiency grader: config, prompt, audio, scoring, engine, API."""
