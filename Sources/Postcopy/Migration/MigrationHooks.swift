/// What the runtime needs from the host around the switchover.
public protocol SourceHooks: AnyObject, Sendable {
    /// Stops every vCPU at a point where its state is consistent; returns when all are stopped.
    func pauseVCPUs()
    /// Resumes the vCPUs (a failed migration before the switchover leaves the source running).
    func resumeVCPUs()
    /// Serializes the device state (vCPU registers, devices) while the vCPUs are stopped.
    func saveDeviceState() -> [UInt8]
}

public protocol DestinationHooks: AnyObject, Sendable {
    /// Restores the device state sent by the source; throws when it is not acceptable.
    func restoreDeviceState(_ bytes: [UInt8]) throws
    /// Starts the vCPUs. Their touches of pages not yet here block until the pages arrive.
    func resumeVCPUs()
}
