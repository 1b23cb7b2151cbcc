/// Migration capabilities and parameters, with QEMU's names (qapi/migration.json).
public struct MigrationSettings: Sendable, Equatable {
    // capabilities
    public var postcopyRAM = false
    public var postcopyBlocktime = false
    /// Requested pages travel on their own channel. On by default here (QEMU's default is off).
    public var postcopyPreempt = true
    /// Parallel data channels for the precopy and postcopy background streams. On by default here
    /// (QEMU's default is off): with 2 channels a 1000 MiB precopy pass fits in the first second,
    /// which cut postcopy blocktime from ~400-800 ms to under 10 ms on the paced linear run.
    public var multifd = true
    public var zeroBlocks = false
    public var events = false

    // parameters
    public var multifdChannels = 2
    /// Bytes per second for precopy; QEMU's default is 128 MiB/s, the harness sets 100 GB/s.
    public var maxBandwidth: Int64 = 134_217_728
    /// Bytes per second for the postcopy background stream; 0 means unlimited.
    public var maxPostcopyBandwidth: Int64 = 0
    public var downtimeLimitMs: Int64 = 300
    /// Pages per background frame (batching; 16 × 4 KiB = 64 KiB per UFFDIO_COPY).
    public var xPagesPerFrame: Int64 = 16
    /// With postcopy-ram: switch to postcopy by itself after this many precopy passes (0: wait
    /// for migrate_start_postcopy).
    public var xPostcopyAfterPasses: Int64 = 0
    /// Pages after a requested one that go with it on the urgent channel (0: just the page).
    /// 16 halved blocktime on the linear and random 1000 MiB runs (BENCHMARKS.md).
    public var xPostcopyReadAhead: Int64 = 16
    /// Milliseconds for a connection's handshake: the destination reads each handshake and
    /// waits for each announced channel within it; the source connects, says hello and gets
    /// the answer within it (0: no limit).
    public var xHandshakeTimeoutMs: Int64 = 10_000
    /// Milliseconds for one whole frame, header and payload, from its first byte (0: no limit).
    public var xFrameTimeoutMs: Int64 = 10_000
    /// Milliseconds a destination waits for the next frame before the switch (setup and
    /// precopy) before it gives the attempt up; after the switch silence is not a failure (0: no limit).
    public var xIncomingIdleTimeoutMs: Int64 = 30_000
    /// Seconds a source in postcopy-paused keeps reconnecting to the destination by itself,
    /// from the moment the link broke (0: only QEMU's manual recovery, `migrate -r`). When the
    /// time runs out the migration stays paused and manual recovery still works.
    public var xPostcopyRecoverTimeout: Int64 = 600
    /// The id of the TLS credentials object every channel runs under (empty: no TLS).
    public var tlsCreds = ""
    /// The host name the source checks the destination's x509 certificate against (empty: the
    /// migration URI's host).
    public var tlsHostname = ""
    /// The id of the `authz-simple` object a destination checks its source against (empty: any
    /// source holding the credentials).
    public var tlsAuthz = ""
    /// A file to record this side's timeline in: one JSON line every 10 ms while a migration
    /// runs (Stats/Timeline.swift; empty: none).
    public var xTimeline = ""
    /// A lazy snapshot restore writes the pages its vCPUs faulted on, in order, to this file
    /// (empty: it records nothing); `xPrefetch` names such a file on a later restore, whose
    /// pages are then loaded first (Snapshot/WorkingSet.swift).
    public var xRecordWorkingSet = ""
    public var xPrefetch = ""
    /// Times each postcopy page request stage by stage on this side (Destination/RequestBreakdown,
    /// Source/RequestServiceTimes), shown under `x-request-breakdown` in query-migrate. Off by
    /// default: the destination keeps one 8-byte stamp per guest page for it.
    public var xRequestBreakdown = false

    public init() {}

    /// The deadlines above in seconds, as the channels take them (0: none).
    public var handshakeTimeout: Double { Double(xHandshakeTimeoutMs) / 1000 }
    public var frameTimeout: Double { Double(xFrameTimeoutMs) / 1000 }
    public var incomingIdleTimeout: Double { Double(xIncomingIdleTimeoutMs) / 1000 }

    public static let capabilityNames = ["zero-blocks", "events", "postcopy-ram", "multifd", "postcopy-blocktime", "postcopy-preempt"]

    /// Older names still accepted (QEMU 2.11-3.1 spelt multifd `x-multifd`, with
    /// `x-multifd-channels` and `x-multifd-page-count`), never listed.
    public static let aliases = [
        "x-multifd": "multifd",
        "x-multifd-channels": "multifd-channels",
        "x-multifd-page-count": "x-pages-per-frame",
    ]

    /// The name a capability or parameter is listed under.
    public static func canonicalName(_ name: String) -> String { aliases[name] ?? name }

    public func capability(_ name: String) -> Bool? {
        switch Self.canonicalName(name) {
        case "postcopy-ram": postcopyRAM
        case "postcopy-blocktime": postcopyBlocktime
        case "postcopy-preempt": postcopyPreempt
        case "multifd": multifd
        case "zero-blocks": zeroBlocks
        case "events": events
        default: nil
        }
    }

    public mutating func setCapability(_ name: String, _ on: Bool) throws(MigrationError) {
        switch Self.canonicalName(name) {
        case "postcopy-ram": postcopyRAM = on
        case "postcopy-blocktime": postcopyBlocktime = on
        case "postcopy-preempt": postcopyPreempt = on
        case "multifd": multifd = on
        case "zero-blocks": zeroBlocks = on
        case "events": events = on
        default: throw MigrationError.invalidSetting("Capability '\(name)' not found (known: \(Self.capabilityNames.joined(separator: ", ")))")
        }
    }

    public var parameters: [(name: String, value: MonitorValue)] {
        [("max-bandwidth", .int(maxBandwidth)),
         ("downtime-limit", .int(downtimeLimitMs)),
         ("multifd-channels", .int(Int64(multifdChannels))),
         ("max-postcopy-bandwidth", .int(maxPostcopyBandwidth)),
         ("x-pages-per-frame", .int(xPagesPerFrame)),
         ("x-postcopy-readahead", .int(xPostcopyReadAhead)),
         ("x-postcopy-after-passes", .int(xPostcopyAfterPasses)),
         ("x-handshake-timeout", .int(xHandshakeTimeoutMs)),
         ("x-frame-timeout", .int(xFrameTimeoutMs)),
         ("x-incoming-idle-timeout", .int(xIncomingIdleTimeoutMs)),
         ("x-postcopy-recover-timeout", .int(xPostcopyRecoverTimeout)),
         ("tls-creds", .string(tlsCreds)),
         ("tls-hostname", .string(tlsHostname)),
         ("tls-authz", .string(tlsAuthz)),
         ("x-timeline", .string(xTimeline)),
         ("x-record-working-set", .string(xRecordWorkingSet)),
         ("x-prefetch", .string(xPrefetch)),
         ("x-request-breakdown", .bool(xRequestBreakdown))]
    }

    public mutating func setParameter(_ given: String, _ value: MonitorValue) throws(MigrationError) {
        let name = Self.canonicalName(given)
        if ["tls-creds", "tls-hostname", "tls-authz", "x-timeline", "x-record-working-set", "x-prefetch"].contains(name) {
            // A string; null or "" turns it off, as in QEMU.
            let text: String
            switch value {
            case .string(let s): text = s
            case .null: text = ""
            default: throw MigrationError.invalidSetting("Parameter '\(name)' expects a string")
            }
            switch name {
            case "tls-creds": tlsCreds = text
            case "tls-hostname": tlsHostname = text
            case "tls-authz": tlsAuthz = text
            case "x-record-working-set": xRecordWorkingSet = text
            case "x-prefetch": xPrefetch = text
            default: xTimeline = text
            }
            return
        }
        if name == "x-request-breakdown" {
            switch value {
            case .bool(let on): xRequestBreakdown = on
            default: throw MigrationError.invalidSetting("Parameter '\(name)' expects a boolean")
            }
            return
        }
        let number: Int64
        switch value {
        case let .int(v): number = v
        case let .double(v): number = Int64(v)
        case let .string(s):
            guard let v = Int64(s) else { throw MigrationError.invalidSetting("Parameter '\(name)' expects a number, got '\(s)'") }
            number = v
        default: throw MigrationError.invalidSetting("Parameter '\(name)' expects a number")
        }
        guard number >= 0 else { throw MigrationError.invalidSetting("Parameter '\(name)' must not be negative") }
        switch name {
        case "max-bandwidth": maxBandwidth = number
        case "downtime-limit": downtimeLimitMs = number
        case "multifd-channels":
            guard (1...255).contains(number) else { throw MigrationError.invalidSetting("Parameter 'multifd-channels' expects a value between 1 and 255") }
            multifdChannels = Int(number)
        case "max-postcopy-bandwidth": maxPostcopyBandwidth = number
        case "x-pages-per-frame":
            guard (1...256).contains(number) else { throw MigrationError.invalidSetting("Parameter 'x-pages-per-frame' expects a value between 1 and 256") }
            xPagesPerFrame = number
        case "x-postcopy-readahead":
            guard (0...256).contains(number) else { throw MigrationError.invalidSetting("Parameter 'x-postcopy-readahead' expects a value between 0 and 256") }
            xPostcopyReadAhead = number
        case "x-postcopy-after-passes": xPostcopyAfterPasses = number
        case "x-handshake-timeout": xHandshakeTimeoutMs = number
        case "x-frame-timeout": xFrameTimeoutMs = number
        case "x-incoming-idle-timeout": xIncomingIdleTimeoutMs = number
        case "x-postcopy-recover-timeout": xPostcopyRecoverTimeout = number
        default: throw MigrationError.invalidSetting("Parameter '\(name)' not found")
        }
    }
}
