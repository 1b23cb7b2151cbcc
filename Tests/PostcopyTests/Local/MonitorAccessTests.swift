import Foundation
import Glibc
import Postcopy
import Testing

/// Who may talk to a host's monitors: the sockets are the owner's alone (mode 0600, whatever
/// the umask), and a connection from another user that gets through anyway is told why it is
/// refused, closed and logged.
@Suite("Monitor socket access")
struct MonitorAccessTests {
    @Test("monitor sockets are created 0600 under umask 000")
    func modeUnderOpenUmask() throws {
        let bed = try TestBed()
        let qmp = bed.directory + "/h.qmp", hmp = bed.directory + "/h.hmp"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "umask 000 && exec \"$0\" host --memory 16M --qmp \"$1\" --monitor \"$2\"", TestHost.executable, qmp, hmp]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        // The QMP server starts first: once HMP answers, both sockets are in place.
        _ = try MonitorClient.connect(path: qmp)
        _ = try MonitorClient.connect(path: hmp)
        for path in [qmp, hmp] {
            var info = stat()
            #expect(lstat(path, &info) == 0)
            #expect(info.st_mode & S_IFMT == S_IFSOCK, "\(path)")
            #expect(String(info.st_mode & 0o777, radix: 8) == "600", "\(path)")
        }
        // The host really ran under umask 000 (sh exec'd it in place: the pid is the host's).
        let status = try String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)
        #expect(status.contains("Umask:\t0000"), "\(status)")
    }

    /// Runs `postcopy monitor` as uid and gid 65534 (nobody), as another local user would.
    static func monitorAsNobody(_ path: String) throws -> PostcopyRun {
        try PostcopyRun(["monitor", path, "info status"], prefix: ["/usr/bin/setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"])
    }

    @Test("another user cannot connect, and one who gets through is refused with the reason and logged",
          .enabled(if: geteuid() == 0, "needs root to run a client as another uid (setpriv --reuid 65534)"),
          .enabled(if: access("/usr/bin/setpriv", X_OK) == 0, "needs util-linux's setpriv to run a client as another uid"),
          arguments: ["qmp", "hmp"])
    func otherUserRefused(_ kind: String) throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "h", memory: "16M")
        let path = kind == "qmp" ? host.qmpPath : host.hmpPath

        let blocked = try Self.monitorAsNobody(path)
        #expect(blocked.status != 0)
        #expect(blocked.stderr.contains("EACCES"), "\(blocked.stderr)")
        #expect(blocked.stderr.contains("a host's monitor sockets are for the user who started it and root only"), "\(blocked.stderr)")

        // Opened up, as a careless chmod or an old umask-made socket would leave it.
        #expect(chmod(path, 0o666) == 0)
        let refused = try Self.monitorAsNobody(path)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("Permission denied: this monitor belongs to uid 0; only that user and root may use it, not uid 65534"),
                "\(refused.stderr)")
        #expect(!refused.stdout.contains("VM status"), "\(refused.stdout)")
        #expect(HostLogTests.waitForLog(host, containing: "\(kind) connection on \(path) refused: pid "), "\(host.log)")
        #expect(host.log.contains("runs as uid 65534; only uid 0 and root may use this monitor"), "\(host.log)")

        // The owner is served as before.
        let owner = try PostcopyRun(["monitor", path, "info status"])
        #expect(owner.stdout == "VM status: running\n", "\(owner.stderr)")
    }
}
