import Foundation
import Postcopy
import Testing

/// The multifd commands as QEMU 2.11-3.1 spelt them, typed at a real host's HMP monitor.
@Suite("HMP multifd aliases on a host process")
struct HMPAliasTests {
    @Test("x-multifd, x-multifd-channels and x-multifd-page-count set multifd, its channels and pages per frame")
    func multifdAliases() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: "16M")
        let hmp = try MonitorClient.connect(path: host.hmpPath)
        #expect(hmp.dialect == .hmp)

        #expect(try hmp.run("migrate_set_capability x-multifd off") == "")
        #expect(try hmp.run("info migrate_capabilities").contains("multifd: off\n"))
        #expect(try hmp.run("migrate_set_capability x-multifd on") == "")
        #expect(try hmp.run("migrate_set_parameter x-multifd-channels 4") == "")
        #expect(try hmp.run("migrate_set_parameter x-multifd-page-count 20") == "")

        let capabilities = try hmp.run("info migrate_capabilities")
        #expect(capabilities.contains("multifd: on\n"))
        let parameters = try hmp.run("info migrate_parameters")
        #expect(parameters.contains("multifd-channels: 4\n"), "\(parameters)")
        #expect(parameters.contains("x-pages-per-frame: 20\n"), "\(parameters)")
        // Accepted, never listed.
        #expect(!(capabilities + parameters).contains("x-multifd"))

        // The alias keeps the real parameter's range.
        #expect(try hmp.run("migrate_set_parameter x-multifd-page-count 257").hasPrefix("Error: "))
        #expect(try hmp.run("info migrate_parameters").contains("x-pages-per-frame: 20\n"))
    }
}
