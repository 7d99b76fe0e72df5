//! `marrow validate`: compare the engine's stages with a torchvision reference dump.
