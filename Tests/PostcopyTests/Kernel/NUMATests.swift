import Postcopy
import Testing

extension KernelTests {
    @Suite("NUMA placement", .enabled(if: NUMA.isAvailable, "the kernel has no NUMA policy support"))
    struct NUMAPlacement {
        @Test("guest memory bound to node 0 reports MPOL_BIND on node 0, and its pages land there")
        func bindToNodeZero() throws {
            let memory = try GuestMemory(size: 16 * KernelTests.pageSize, numaNode: 0)
            let policy = try memory.memoryPolicy()
            #expect(policy.mode == NUMA.bindMode)
            #expect(policy.node == 0)
            memory.pointer.storeBytes(of: 1, as: UInt64.self)
            #expect(NUMA.node(ofPage: memory.pointer) == 0)
        }
    }
}
