import Foundation
import Postcopy

/// Shrinks a case that produced a finding to one small enough to keep in the repository:
/// page frames become zero-page frames over the same range (no payload), then steps are
/// dropped, each change kept only if the case still gets the same verdict. Chunks halve
/// from half the candidates down to one (delta debugging, greedy).
struct CaseMinimizer {
    let campaign: FuzzCampaign
    /// Replays allowed in all.
    var budget = 300

    /// What must stay the same: the verdict, and for a crash where it crashed (the last
    /// source location of the summary), so a smaller case does not trade one bug for another.
    static func signature(_ verdict: FuzzCampaign.Verdict, _ detail: String) -> String {
        guard verdict == .crash else { return verdict.rawValue }
        return "crash at " + (detail.components(separatedBy: " | ").last ?? "")
    }

    mutating func minimize(_ original: ReplayCase, keeping target: String, progress: (String) -> Void) throws -> ReplayCase {
        var current = original
        // Pages to zero pages: the payload goes, the header keeps its range.
        current = try shrink(current, target, "pages to zero pages", candidates: { c in
            c.steps.indices.filter { if case .send(_, let b, .frame) = c.steps[$0] { b[0] == FrameKind.pages.rawValue } else { false } }
        }, change: { c, indices in
            for i in indices {
                guard case .send(let conn, let bytes, .frame) = c.steps[i] else { continue }
                var header = Array(bytes[..<FrameHeader.size])
                header[0] = FrameKind.zeroPages.rawValue
                c.steps[i] = .send(connection: conn, bytes: header, unit: .frame)
            }
        }, progress)
        // Steps out: every send and await (opens go with their connection's sends).
        current = try shrink(current, target, "steps dropped", candidates: { c in
            c.steps.indices.filter { if case .open = c.steps[$0] { false } else { true } }
        }, change: { c, indices in
            let drop = Set(indices)
            c.steps = c.steps.enumerated().filter { !drop.contains($0.offset) }.map(\.element)
        }, progress)
        return current
    }

    private mutating func shrink(_ start: ReplayCase, _ target: String, _ what: String,
                                 candidates: (ReplayCase) -> [Int], change: (inout ReplayCase, [Int]) -> Void,
                                 _ progress: (String) -> Void) throws -> ReplayCase {
        var current = start
        var chunk = max(1, candidates(current).count / 2)
        while budget > 0 {
            var offset = 0
            while budget > 0 {
                let indices = candidates(current)
                guard offset < indices.count else { break }
                var trial = current
                change(&trial, Array(indices[offset..<min(offset + chunk, indices.count)]))
                budget -= 1
                let (verdict, detail) = try campaign.verdict(of: trial)
                if Self.signature(verdict, detail) == target {
                    current = trial   // the same indices now name the next candidates
                    progress("\(what): \(indices.count) candidates, \(current.steps.count) steps, \(current.byteCount) bytes")
                } else {
                    offset += chunk
                }
            }
            if chunk == 1 { break }
            chunk /= 2
        }
        return current
    }
}
