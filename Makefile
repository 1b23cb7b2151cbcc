# The README's two commands, and what they need. Each installs what is missing first
# (scripts/setup.sh: apt and pip packages; without root it prints the command to run).
SWIFT ?= /opt/swift/usr/bin/swift
export PATH := /opt/swift/usr/bin:$(PATH)

.PHONY: demo test setup setup-test build release bench-faults

# The main job: two local hosts, one postcopy migration, info migrate from both sides.
demo: setup release
	.build/release/postcopy demo

# Every suite: unit tests, multi-process migrations, monitor protocol tests, qemu.qmp clients.
test: setup-test
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --no-parallel

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

build: setup
	$(SWIFT) build

release: setup
	$(SWIFT) build -c release

bench-faults: release
	.build/release/postcopy bench faults --json
