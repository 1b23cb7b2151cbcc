@testable import Postcopy
import Testing

extension MonitorTests {
    /// The expected texts are QEMU 7.2's own, from anchors/qemu/info-migrate-7.2.txt.
    @Suite("Monitor info migrate and query-migrate")
    struct InfoMigrateTests {
        static let globals = """
            globals:
            store-global-state: on
            only-migratable: off
            send-configuration: on
            send-section-footer: on
            decompress-error-check: on
            clear-bitmap-shift: 18

            """

        /// `kbytes` as QEMU prints them come from bytes >> 10; the odd bytes show they are dropped.
        static func kib(_ k: UInt64) -> UInt64 { k << 10 | 517 }

        static var completedSource: MigrationInfo {
            var info = MigrationInfo()
            info.status = "completed"
            info.totalTimeMs = 1232
            info.downtimeMs = 1
            info.setupTimeMs = 4
            var ram = MigrationInfo.RAM()
            ram.transferred = kib(714_440)
            ram.mbps = 4766.16
            ram.remaining = 0
            ram.total = kib(733_768)
            ram.duplicate = 55552
            ram.normal = 178_140
            ram.normalBytes = kib(712_560)
            ram.dirtySyncCount = 2
            ram.pageSize = 4096
            ram.pagesPerSecond = 230_294
            ram.postcopyRequests = 3742
            ram.precopyBytes = kib(201_554)
            ram.postcopyBytes = kib(512_885)
            info.ram = ram
            return info
        }

        @Test("a completed source run prints QEMU 7.2's lines, in its order")
        func completedSourceText() {
            #expect(Self.completedSource.infoMigrateText == Self.globals + """
                Migration status: completed
                total time: 1232 ms
                downtime: 1 ms
                setup: 4 ms
                transferred ram: 714440 kbytes
                throughput: 4766.16 mbps
                remaining ram: 0 kbytes
                total ram: 733768 kbytes
                duplicate: 55552 pages
                skipped: 0 pages
                normal: 178140 pages
                normal bytes: 712560 kbytes
                dirty sync count: 2
                page size: 4 kbytes
                multifd bytes: 0 kbytes
                pages-per-second: 230294
                postcopy request count: 3742
                precopy ram: 201554 kbytes
                postcopy ram: 512885 kbytes

                """)
        }

        @Test("during precopy: expected downtime, and no postcopy lines while they are zero")
        func precopyText() {
            var info = MigrationInfo()
            info.status = "active"
            info.totalTimeMs = 501
            info.expectedDowntimeMs = 300
            info.setupTimeMs = 4
            var ram = MigrationInfo.RAM()
            ram.transferred = Self.kib(185_130)
            ram.mbps = 2991.56
            ram.remaining = Self.kib(548_132)
            ram.total = Self.kib(733_768)
            ram.duplicate = 216
            ram.normal = 46192
            ram.normalBytes = Self.kib(184_768)
            ram.dirtySyncCount = 1
            ram.pagesPerSecond = 91117
            ram.precopyBytes = Self.kib(185_130)
            info.ram = ram
            #expect(info.infoMigrateText == Self.globals + """
                Migration status: active
                total time: 501 ms
                expected downtime: 300 ms
                setup: 4 ms
                transferred ram: 185130 kbytes
                throughput: 2991.56 mbps
                remaining ram: 548132 kbytes
                total ram: 733768 kbytes
                duplicate: 216 pages
                skipped: 0 pages
                normal: 46192 pages
                normal bytes: 184768 kbytes
                dirty sync count: 1
                page size: 4 kbytes
                multifd bytes: 0 kbytes
                pages-per-second: 91117
                precopy ram: 185130 kbytes

                """)
        }

        static var completedDestination: MigrationInfo {
            var info = MigrationInfo()
            info.status = "completed"
            info.postcopyBlocktimeMs = 0
            info.postcopyVcpuBlocktimeMs = [108, 0]
            return info
        }

        @Test("the destination prints blocktime as QEMU does, vCPU 0 first")
        func destinationText() {
            #expect(Self.completedDestination.infoMigrateText == Self.globals + """
                Migration status: completed
                total time: 0 ms
                postcopy blocktime: 0
                postcopy vcpu blocktime: 108,0

                """)
        }

        @Test("the destination's query-migrate has exactly QEMU's members")
        func destinationQMP() {
            #expect(Self.completedDestination.qmpValue == .object([
                ("status", .string("completed")),
                ("postcopy-blocktime", .int(0)),
                ("postcopy-vcpu-blocktime", .array([.int(108), .int(0)])),
            ]))
        }

        @Test("before any migration, QEMU says nothing: {} and only the globals")
        func noMigration() {
            #expect(MigrationInfo().qmpValue == .object([]))
            #expect(MigrationInfo().infoMigrateText == Self.globals)
        }

        @Test("a failed migration says why, on the status line and in error-desc")
        func failed() {
            var info = MigrationInfo()
            info.status = "failed"
            info.totalTimeMs = 10
            info.errorDescription = "Connection refused"
            #expect(info.infoMigrateText.contains("Migration status: failed (Connection refused)\ntotal time: 10 ms\n"))
            #expect(info.qmpValue["error-desc"] == .string("Connection refused"))
        }

        @Test("query-migrate's ram has QEMU's member names and values in bytes")
        func sourceQMP() throws {
            let value = Self.completedSource.qmpValue
            #expect(value.objectMembers?.map(\.0) == ["status", "ram", "total-time", "downtime", "setup-time"])
            let ram = try #require(value["ram"])
            #expect(ram.objectMembers?.map(\.0) == [
                "transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate", "mbps",
                "dirty-sync-count", "postcopy-requests", "page-size", "multifd-bytes", "pages-per-second",
                "precopy-bytes", "downtime-bytes", "postcopy-bytes",
            ])
            #expect(ram["transferred"] == .int(Int64(Self.kib(714_440))))
            #expect(ram["mbps"] == .double(4766.16))
            #expect(ram["page-size"] == .int(4096))
            #expect(value["total-time"] == .int(1232))
        }

        static var latency: MigrationInfo.FaultLatency {
            var latency = MigrationInfo.FaultLatency()
            latency.averageUs = 120
            latency.vcpuAverageUs = [100, 140]
            latency.nonVcpuAverageUs = 7
            latency.distribution = [0, 0, 1, 5, 0]
            latency.faults = 6
            latency.p50Us = 9
            latency.p99Us = 15
            latency.maxUs = 16
            return latency
        }

        @Test("latency goes out in QEMU 10.1's units: averages in ns, histogram buckets in µs")
        func latencyQMP() {
            var info = Self.completedDestination
            info.latency = Self.latency
            let value = info.qmpValue
            #expect(value["postcopy-latency"] == .int(120_000))
            #expect(value["postcopy-vcpu-latency"] == .array([.int(100_000), .int(140_000)]))
            #expect(value["postcopy-non-vcpu-latency"] == .int(7000))
            #expect(value["postcopy-latency-dist"] == .array([0, 0, 1, 5, 0].map(MonitorValue.int)))
            #expect(value["x-postcopy-latency-percentiles"] == .object([
                ("p50", .int(9000)), ("p99", .int(15000)), ("max", .int(16000)), ("faults", .int(6)),
            ]))
        }

        @Test("latency lines follow QEMU's, in QEMU 10.1's form")
        func latencyText() {
            var info = Self.completedDestination
            info.latency = Self.latency
            #expect(info.infoMigrateText.hasSuffix("""
                postcopy vcpu blocktime: 108,0
                Postcopy Latency (ns): 120000
                Postcopy non-vCPU Latencies (ns): 7000
                Postcopy vCPU Latencies (ns):
                 [100000, 140000]
                Postcopy Latency Distribution:
                  [     1 us -     2 us ]:          0
                  [     2 us -     4 us ]:          0
                  [     4 us -     8 us ]:          1
                  [     8 us -    16 us ]:          5
                  [    16 us -    32 us ]:          0
                Postcopy Latency Percentiles (ns): p50=9000, p99=15000, max=16000, faults=6

                """))
        }

        @Test("how the source finds dirty pages is shown beside QEMU's fields, under an x- name in QMP")
        func dirtyTracking() {
            var info = Self.completedSource
            info.dirtyTracking = "pagemap-scan"
            #expect(info.qmpValue["x-dirty-tracking"] == .string("pagemap-scan"))
            #expect(info.infoMigrateText.hasSuffix("postcopy ram: 512885 kbytes\ndirty tracking: pagemap-scan\n"))
        }

        @Test("QEMU's bucket labels: integer division into us, ms and sec")
        func bucketLabels() {
            typealias L = MigrationInfo.FaultLatency
            #expect(L.timeString(microseconds: 512) == "512 us")
            #expect(L.timeString(microseconds: 1024) == "1 ms")
            #expect(L.timeString(microseconds: 65536) == "65 ms")
            #expect(L.timeString(microseconds: 1 << 24) == "16 sec")
        }

        @Test("per-vCPU lists wrap after ten values, as QEMU's")
        func wrapping() {
            #expect(MigrationInfo.FaultLatency.wrapped(Array(1 ... 12)) == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,\n  11, 12")
        }
    }
}
