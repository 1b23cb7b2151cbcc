/// What the runtime needs from the host around the switchover.
public protocol SourceHooks: AnyObject, Sendable {
    /// Stops every vCPU at a point where its state is consistent; returns when all are stopped.
    func pauseVCPUs()
    /// Resumes the vCPUs (a failed migration before the switchover leaves the source running).
    func resumeVCPUs()
    /// Serializes the device state (vCPU registers, devices) while the vCPUs are stopped.
    func saveDeviceState() -> [UInt8]
    /// A dirty tracker over `memory` for a precopy, tracking from now on: every page counts as
    /// clean until written. The default is the library's (`PagemapDirtyTracker`); a host whose
    /// hypervisor logs the guest's writes can return its own (`postcopy vm`: KVM's dirty log).
    /// It must report every write made after this returns, by the guest or by the host itself.
    func makeDirtyTracker(for memory: GuestMemory) throws -> any DirtyTracker
}

/// What the switchover's pause changes in a source's state: a migration's (`SourceState`) or a
/// snapshot save's.
protocol PausableSourceState {
    var status: MigrationStatus { get }
    var pausedNs: UInt64? { get set }
    var vcpusPaused: Bool { get set }
}

extension SourceHooks {
    public func makeDirtyTracker(for memory: GuestMemory) throws -> any DirtyTracker {
        try PagemapDirtyTracker(memory: memory)
    }

    /// Pauses the vCPUs for the last pass, unless the migration or save left `active` meanwhile:
    /// then the guest keeps running here and this throws `cancelled`.
    func pauseForSwitch<State: PausableSourceState>(_ state: Guarded<State>) throws {
        guard state.read({ $0.status == .active }) else { throw MigrationError.cancelled }
        // The downtime counts from the request, as QEMU's does (downtime_start before vm_stop):
        // parking the vCPUs is part of it (0.3-7 ms for a KVM vCPU on a busy machine).
        let requested = monotonicNanoseconds()
        pauseVCPUs()
        let paused = state.update { s -> Bool in
            guard s.status == .active else { return false }
            s.pausedNs = requested
            s.vcpusPaused = true
            return true
        }
        if !paused {
            resumeVCPUs()
            throw MigrationError.cancelled
        }
    }
}

public protocol DestinationHooks: AnyObject, Sendable {
    /// Restores the device state sent by the source; throws when it is not acceptable.
    func restoreDeviceState(_ bytes: [UInt8]) throws
    /// Starts the vCPUs. Their touches of pages not yet here block until the pages arrive.
    func resumeVCPUs()
}
