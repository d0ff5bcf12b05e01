"""Configs shipped with llama_mimi_tt (installed as the package ``llama_mimi_tt.configs``)."""
