"""The node's ground: home folder, identity file, config, energy profiles, atomic files, run lock, test faults."""
