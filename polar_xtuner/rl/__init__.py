"""POLAR as the reward in RL: the verl and OpenRLHF reward functions and the RFT prompt files."""
