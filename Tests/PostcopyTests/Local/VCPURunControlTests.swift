import Foundation
import Glibc
import Postcopy
import Testing
@testable import postcopy

/// The pause every host relies on (the switchover's before the final dirty sync and the device
/// state, `stop` before `x-check-memory`): once it returns, no vCPU takes another step until
/// the guest is resumed.
@Suite("vCPU run control")
struct VCPURunControlTests {
    @Test("a pause right after a resume returns only once every vCPU has stopped: none takes a step while paused")
    func pauseRightAfterResume() throws {
        let vcpus = 2, rounds = 1000
        // Incoming: the vCPUs start parked, as on a destination waiting for its guest.
        let run = VCPURunControl(vcpuCount: vcpus, incoming: true)
        let holdsPaused = AtomicFlag(), quit = AtomicFlag()
        let stepsWhilePaused = AtomicCounter()
        let threadIDs = AtomicWords(count: vcpus)
        var threads: [JoinableThread] = []
        for i in 0..<vcpus {
            threads.append(try JoinableThread("test-vcpu\(i)") {
                threadIDs.store(i, UInt64(currentThreadID()))
                run.vcpuStarted()
                // The host's vCPU loop: look for a pause, then take one step.
                while !quit.isSet {
                    if run.pauseWanted { run.park(i) }
                    if holdsPaused.isSet { stepsWhilePaused.add(1) }
                }
            })
        }
        run.waitUntilStarted()
        // A thread parked on the run control's condition sleeps (S); one still running shows R.
        let allSleep = {
            (0..<vcpus).allSatisfy { i in
                let stat = (try? String(contentsOfFile: "/proc/self/task/\(threadIDs.load(i))/stat", encoding: .utf8)) ?? ""
                return stat.split(separator: ")").last?.split(separator: " ").first == "S"
            }
        }
        var settled = true
        for _ in 0..<rounds where settled {
            run.resume()
            run.pause(as: .paused)
            holdsPaused.set()
            // A vCPU counted as parked while it was still on its way out of its last park would
            // take its step now, then park again: hold the pause until every vCPU sleeps.
            settled = waitUntil(timeout: 10, interval: 0) { allSleep() }
            holdsPaused.clear()
        }
        quit.set()
        run.resume()
        for thread in threads { thread.join() }
        #expect(settled, "a vCPU kept running after the pause returned")
        #expect(stepsWhilePaused.value == 0, "\(stepsWhilePaused.value) steps ran while the guest was paused")
    }
}
