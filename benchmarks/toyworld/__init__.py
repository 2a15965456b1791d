"""A small trained world where P3S's claims are measured (issue 23).

``world.py`` draws the synthetic images and holds the fixed latent map and the tokenizer;
``build.py`` trains the world's models from fixed seeds on the CPU (one command, cached by seed and
config hash); ``p3s_path.py`` runs P3S through the code users run (RNGR, inpainting, the diffusers
engine's training step and generation); ``evaluate.py`` measures the claims and writes the results.
"""
