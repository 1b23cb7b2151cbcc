import Foundation
import Postcopy
import Testing

@Suite("TLS objects: QEMU's syntax, files and errors")
struct SecurityObjectsTests {
    @Test("an object with a missing key file is refused with the command that makes one")
    func missingPSKFile() throws {
        let objects = SecurityObjects()
        #expect {
            try objects.add(commandLine: "tls-creds-psk,id=tls0,endpoint=server,dir=/nonexistent")
        } throws: { "\($0)".contains("echo \"qemu:$(openssl rand -hex 32)\" > /nonexistent/keys.psk") }
    }

    @Test("a client needs a key for its username; ids are unique; object-del frees the id")
    func pskObjects() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-psk-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try TLSFiles.writePSK(in: directory, identity: "alice")
        let objects = SecurityObjects()
        #expect { try objects.add(commandLine: "tls-creds-psk,id=c,endpoint=client,dir=\(directory)") } throws: {
            "\($0)".contains("no key for username 'qemu'")
        }
        try objects.add(commandLine: "tls-creds-psk,id=c,endpoint=client,dir=\(directory),username=alice")
        #expect { try objects.add(commandLine: "tls-creds-psk,id=c,endpoint=server,dir=\(directory)") } throws: {
            "\($0)".contains("duplicate property 'c'")
        }
        try objects.delete(id: "c")
        try objects.add(commandLine: "tls-creds-psk,id=c,endpoint=server,dir=\(directory)")
        #expect { try objects.delete(id: "nope") } throws: { "\($0)" == "object 'nope' not found" }
    }

    @Test("x509 credentials without their certificate files are refused when added")
    func x509MissingFiles() throws {
        #expect { try SecurityObjects().add(commandLine: "tls-creds-x509,id=x,endpoint=server,dir=/nonexistent") } throws: {
            "\($0)".contains("cannot load /nonexistent/ca-cert.pem")
        }
    }

    @Test("an authz-simple identity may hold commas, written twice as in QEMU's -object")
    func doubledCommas() throws {
        let objects = SecurityObjects()
        #expect { try objects.add(commandLine: "authz-simple,id=a,identity=CN=client,O=Example") } throws: {
            "\($0)".contains("unknown property 'O'")
        }
        try objects.add(commandLine: "authz-simple,id=a,identity=CN=client,,O=Example")
        #expect { try objects.add(commandLine: "authz-simple,id=b,identity=x,colour=blue") } throws: {
            "\($0)".contains("unknown property 'colour'")
        }
        #expect { try objects.add(commandLine: "tls-creds-anon,id=c") } throws: { "\($0)".contains("invalid object type: tls-creds-anon") }
    }
}
