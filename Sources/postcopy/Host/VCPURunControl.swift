import Postcopy

/// The run state both hosts share (`postcopy host` and `postcopy vm`): QEMU's RunState, the
/// parking of vCPU threads for a pause, autostart for a destination that waits, and the `STOP`
/// and `RESUME` events. A host's vCPU loop checks `pauseWanted` before each step and calls
/// `park(_:)` when it is set; the host supplies how to get a vCPU's attention (`kick`).
/// A destination's vCPU blocked on a page still on the source cannot park (it sleeps in the
/// kernel until the page comes, which a paused postcopy may delay indefinitely): a pause counts
/// it as stopped (`waitsForPage`), and it parks once the page lets it go.
final class VCPURunControl: @unchecked Sendable {
    private struct Control {
        var pauseRequested: Bool
        /// How many pauses have ended: a parked vCPU leaves once it changes.
        var resumes: UInt64 = 0
        /// The vCPUs parked in the current pause; a resume releases them and zeroes this at once,
        /// so a pause that follows never counts a vCPU still on its way out of the last one.
        var parked = 0
        /// Which vCPUs are parked (by index).
        var parkedVCPUs: [Bool]
        var started = 0
        var runState: RunState
        /// Whether the guest starts when an incoming migration hands it over (QEMU's autostart):
        /// `stop` while waiting clears it, `cont` sets it again.
        var autostart = true
    }

    let vcpuCount: Int
    /// Checked by every vCPU before each step; set while a pause is wanted. Read without a lock,
    /// changed only under the control lock together with `pauseRequested`, so a resume and a pause
    /// on two threads cannot leave it clear while a pause waits.
    private let pauseFlag = AtomicFlag()
    private let control: Guarded<Control>
    private let quitRequested = Guarded(false)
    /// Where `STOP` and `RESUME` go (the controller's bus); set before the monitors start.
    var events: MonitorEvents?
    /// Whether vCPU `index` is blocked on a page that has not arrived (the migration's
    /// blocktime view); set before the monitors start.
    var waitsForPage: @Sendable (Int) -> Bool = { _ in false }

    /// A destination's vCPUs (`incoming`) exist from the start but wait for the switchover
    /// (QEMU's "inmigrate").
    init(vcpuCount: Int, incoming: Bool) {
        self.vcpuCount = vcpuCount
        control = Guarded(Control(pauseRequested: incoming, parkedVCPUs: Array(repeating: false, count: vcpuCount),
                                  runState: incoming ? .inmigrate : .running))
        if incoming { pauseFlag.set() }
    }

    @inline(__always) var pauseWanted: Bool { pauseFlag.isSet }

    /// Called by each vCPU thread as it starts.
    func vcpuStarted() { control.update { $0.started += 1 } }

    /// Returns once every vCPU thread has started (and, on a destination, parked).
    func waitUntilStarted() {
        control.wait { $0.started == self.vcpuCount }
        if pauseWanted { control.wait { $0.parked == self.vcpuCount } }
    }

    /// Parks the calling vCPU (`index`) until the pause ends. The resume that ends it also
    /// counts it as no longer parked (a vCPU that left the wait but had not yet said so, counted
    /// by the next pause, would take one more step after that pause returned: a write after the
    /// switchover's final dirty sync, or during `x-check-memory`).
    func park(_ index: Int) {
        let parkedIn = control.update { c -> UInt64? in
            guard c.pauseRequested else { return nil }   // resumed since the flag was read
            c.parked += 1
            c.parkedVCPUs[index] = true
            return c.resumes
        }
        guard let parkedIn else { return }
        control.wait { $0.resumes != parkedIn }
    }

    /// Every vCPU is parked, or blocked on a missing page (it cannot run either).
    private func allStopped() -> Bool {
        let parked = control.read { $0.parkedVCPUs }
        return parked.indices.allSatisfy { parked[$0] || waitsForPage($0) }
    }

    /// Blocks the calling vCPU until a pause is wanted (a halted guest, which only a stop ends).
    func waitForPauseRequest() { control.wait { $0.pauseRequested } }

    var runState: RunState { control.read { $0.runState } }

    /// Stops every vCPU (`kick` gets their attention) and returns once all are parked; a
    /// running guest's state becomes `state`. QEMU raises `STOP` once they have stopped.
    func pause(as state: RunState, kick: () -> Void = {}) {
        let wasRunning = control.update { c in
            defer { c.pauseRequested = true; if c.runState.isRunning { c.runState = state } }
            pauseFlag.set()
            return c.runState.isRunning
        }
        kick()
        // A blocked vCPU changes nothing the lock sees when its page comes: look every 5 ms.
        while !control.wait(timeout: 0.005, until: { $0.parked == self.vcpuCount }) {
            if allStopped() { break }
        }
        if wasRunning { events?.emit("STOP") }
    }

    /// Lets the vCPUs run and raises `RESUME`, as QEMU does. A destination told to `stop`
    /// while it waited stays paused when the migration hands it the guest (no autostart).
    func resume() {
        let (wasRunning, start) = control.update { c -> (Bool, Bool) in
            let wasRunning = c.runState.isRunning
            if c.runState == .inmigrate, !c.autostart {
                c.runState = .paused
                return (wasRunning, false)
            }
            c.pauseRequested = false
            pauseFlag.clear()
            c.resumes &+= 1
            c.parked = 0
            for i in c.parkedVCPUs.indices { c.parkedVCPUs[i] = false }
            c.runState = .running
            return (wasRunning, true)
        }
        if start, !wasRunning { events?.emit("RESUME") }
    }

    /// On a destination still waiting for its guest, `stop` and `cont` only decide whether the
    /// guest starts when it arrives (QEMU's autostart): nothing may run before its state is here.
    func stop(kick: () -> Void = {}) {
        if setAutostartIfWaiting(false) { return }
        pause(as: .paused, kick: kick)
        control.update { $0.runState = .paused }
    }

    func cont() {
        if setAutostartIfWaiting(true) { return }
        resume()
    }

    private func setAutostartIfWaiting(_ autostart: Bool) -> Bool {
        control.update { c -> Bool in
            guard c.runState == .inmigrate else { return false }
            c.autostart = autostart
            return true
        }
    }

    func quit() { quitRequested.update { $0 = true } }
    func waitForQuit() { quitRequested.wait { $0 } }
}
