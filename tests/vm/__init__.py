"""The real-kernel test lane: see README.md beside this file. Tests import `vm.lane`."""
