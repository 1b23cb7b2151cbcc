import Foundation
import Glibc
import Postcopy
import Testing

extension KernelTests {
    @Suite("userfaultfd permissions")
    struct Permissions {
        /// vm.unprivileged_userfaultfd=1 lets any user call userfaultfd(2), so there is nothing to refuse.
        static var anyoneMayOpen: Bool {
            (try? String(contentsOfFile: "/proc/sys/vm/unprivileged_userfaultfd", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == "1"
        }

        @Test("an unprivileged user is told what to grant: access to /dev/userfaultfd or CAP_SYS_PTRACE",
              .enabled(if: getuid() == 0, "dropping to nobody needs root"),
              .disabled(if: anyoneMayOpen, "vm.unprivileged_userfaultfd=1 lets any user open a userfaultfd"))
        func unprivilegedOpen() throws {
            let report = try openUserfaultAsNobody()
            #expect(report.hasPrefix("UserfaultUnavailable: "), "\(report)")
            #expect(report.contains("/dev/userfaultfd"))
            #expect(report.contains("CAP_SYS_PTRACE"))
        }

        struct ChildHung: Error, CustomStringConvertible {
            var description: String { "the child did not report within 20 s and was killed" }
        }

        /// Forks a child that drops to nobody (uid and gid 65534, no supplementary groups), opens a
        /// userfaultfd and writes what happened to a pipe. The child only runs this thread, so it
        /// does as little as it can before `_exit`; the parent gives up on it after 20 s.
        func openUserfaultAsNobody() throws -> String {
            var pipeFDs: [Int32] = [-1, -1]
            guard pipe(&pipeFDs) == 0 else { throw SystemError("pipe") }
            let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])
            let pid = fork()
            if pid == 0 {
                close(readEnd)
                var report: String
                if setgroups(0, nil) != 0 || setgid(65534) != 0 || setuid(65534) != 0 {
                    report = "could not drop to nobody: errno \(errno)"
                } else {
                    do {
                        _ = try UserfaultFD()
                        report = "opened a userfaultfd"
                    } catch let error as UserfaultUnavailable {
                        report = "UserfaultUnavailable: \(error)"
                    } catch {
                        report = "\(type(of: error)): \(error)"
                    }
                }
                report.withUTF8 { _ = write(writeEnd, $0.baseAddress, $0.count) }
                _exit(0)
            }
            close(writeEnd)
            defer { close(readEnd) }
            guard pid > 0 else { throw SystemError("fork") }

            var output: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            var ended = false
            let deadline = ContinuousClock.now + .seconds(20)
            while !ended, ContinuousClock.now < deadline {
                var ready = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
                guard poll(&ready, 1, 100) > 0 else { continue }
                let n = read(readEnd, &buffer, buffer.count)
                if n > 0 { output += buffer[0..<n] } else { ended = true }
            }
            if !ended { kill(pid, SIGKILL) }
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            guard ended else { throw ChildHung() }
            return String(decoding: output, as: UTF8.self)
        }
    }
}
