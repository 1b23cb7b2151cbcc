# The README's two commands, and what they need.
SWIFT ?= /opt/swift/usr/bin/swift
export PATH := /opt/swift/usr/bin:$(PATH)

.PHONY: demo test build release bench-faults

# The main job: two local hosts, one postcopy migration, info migrate from both sides.
demo: release
	.build/release/postcopy demo

# Every suite: unit tests, multi-process migrations, monitor protocol tests.
test:
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --no-parallel

build:
	$(SWIFT) build

release:
	$(SWIFT) build -c release

bench-faults: release
	.build/release/postcopy bench faults --json
