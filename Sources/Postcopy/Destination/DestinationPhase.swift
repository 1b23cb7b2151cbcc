/// Where the destination's current attempt stands. The phase decides which frames are legal
/// on which channel (`admits`, the one table); a frame it does not admit ends the attempt.
/// `MigrationStatus` is what the monitors show; the phase is finer (the status stays `active`
/// from the handshake to `run`).
enum DestinationPhase: UInt8, Sendable, CustomStringConvertible {
    /// Waiting for a source to connect (again, after a refused or failed attempt).
    case listening
    /// Reading each channel's handshake; userfaultfd is registered at its end.
    case handshaking
    /// Pages stream in on main and multifd while the guest runs at the source.
    case precopy
    /// The source paused its guest: pages that went stale since it sent them are dropped.
    case discarding
    /// The device state is restored; only `run` may follow.
    case deviceRestored
    /// The vCPUs run here: postcopy, or the end of a precopy that converged. The migration may
    /// be paused (a channel broke; the status says so): no receiver runs then.
    case running
    /// A paused postcopy is being resumed: the source's new channels say hello and this side
    /// sends its received bitmap; no frame is read.
    case resuming
    /// Completed or failed (the status says which); late pages are read and dropped.
    case finished

    /// Whether new urgent and multifd channels of the session are awaited (`announcedChannels`).
    var awaitsChannels: Bool { self == .handshaking || self == .resuming }

    /// Which channel a frame came on.
    enum Channel: Sendable, CustomStringConvertible {
        case main, urgent, multifd
        var description: String {
            switch self {
            case .main: "main"
            case .urgent: "urgent"
            case .multifd: "multifd"
            }
        }
    }

    /// The one table of legal frames: `kind` on `channel` in this phase.
    @inline(__always)
    func admits(_ kind: FrameKind, on channel: Channel) -> Bool {
        switch kind {
        case .error:
            true   // the peer's reason is always read, so that it can be reported
        case .pages, .zeroPages:
            switch self {
            case .precopy: channel != .urgent   // urgent carries only answers to requests
            case .running, .finished: true      // after completion, what was in flight is dropped
            default: false
            }
        case .sync:
            channel == .multifd && self == .precopy
        case .syncWait:
            channel == .main && self == .precopy
        case .discard:
            channel == .main && (self == .precopy || self == .discarding)
        case .deviceState:
            channel == .main && (self == .precopy || self == .discarding)
        case .run:
            channel == .main && self == .deviceRestored
        case .complete:
            channel == .main && (self == .running || self == .finished)
        case .hello, .helloAck, .request, .running, .done, .receivedBitmap:
            false   // the handshake is not a frame; the others travel on the return path
        }
    }

    /// Before the switch the source is expected to keep sending: silence past
    /// `x-incoming-idle-timeout` ends the attempt. Once the guest runs here, silence is not a
    /// failure (a quiet guest asks for nothing); the recovery issue decides what a lost
    /// source means then.
    var silenceEndsAttempt: Bool {
        switch self {
        case .handshaking, .precopy, .discarding, .deviceRestored: true
        case .listening, .running, .resuming, .finished: false
        }
    }

    /// The error that ends the attempt when a frame is not admitted.
    func violation(_ kind: FrameKind, on channel: Channel) -> MigrationError {
        .protocolViolation("unexpected \(kind) frame on the \(channel) channel \(self)")
    }

    var description: String {
        switch self {
        case .listening: "before the handshake"
        case .handshaking: "during the handshake"
        case .precopy: "during precopy (before the device state)"
        case .discarding: "while stale pages are dropped (before the device state)"
        case .deviceRestored: "after the device state (only run may follow)"
        case .running: "after run (the vCPUs run here)"
        case .resuming: "while a paused postcopy resumes"
        case .finished: "after the migration ended"
        }
    }
}
