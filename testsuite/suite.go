// Package testsuite is the conformance suite of github.com/snapmeta/storage:
// every engine (bbolt, etcd, or a third party's) runs MetaStoreSuite against
// stores it opens, and passes only if it behaves as containerd's
// core/snapshots/storage does, plus the transaction rules of this module
// (read-only transactions, finished transactions, closed stores, rollback,
// persistence, concurrent writers).
//
// A typical engine test:
//
//	func TestBoltConformance(t *testing.T) {
//		testsuite.MetaStoreSuite(t, "bolt", func(t testing.TB, root string) (storage.MetaStore, error) {
//			return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
//		})
//	}
package testsuite

import (
	"strings"
	"sync"
	"testing"

	"github.com/snapmeta/storage"
)

// Opener opens the store kept at root. Opening the same root again (after
// Close) must reach the same data; different roots are isolated stores. For
// bbolt root is a directory (t.TempDir()), for etcd a key prefix.
//
// The suite closes every store it opens (closing twice must return nil), so
// an Opener need not register its own cleanup for the store; it may register
// cleanups for anything else it starts, on t.
type Opener func(t testing.TB, root string) (storage.MetaStore, error)

// scenario is one top-level group of the suite; it opens its own stores.
type scenario struct {
	name string
	run  func(t *testing.T, open Opener)
}

// scenarios lists every group, in the order they run.
var scenarios = []scenario{
	{"GetInfo", testGetInfo},
	{"WalkInfo", testWalkInfo},
	{"GetSnapshot", testGetSnapshot},
	{"CreateSnapshot", testCreateSnapshot},
	{"CommitActive", testCommitActive},
	{"Remove", testRemove},
	{"ParentIDChain", testParentIDChain},
	{"RebaseOnCommit", testRebaseOnCommit},
	{"UpdateInfo", testUpdateInfo},
	{"Usage", testUsage},
	{"IDMap", testIDMap},
	{"IDs", testIDs},
	{"Rollback", testRollback},
	{"Persistence", testPersistence},
	{"Misuse", testMisuse},
	{"WithTransaction", testWithTransaction},
	{"Concurrency", testConcurrency},
}

// MetaStoreSuite runs the conformance suite against the stores open returns,
// as subtests named name+"/<Scenario>/<behaviour>". Every subtest opens a
// store on a fresh root (t.TempDir()), so subtests never see each other's
// data, and closes it when it ends.
//
// An engine that passes guarantees, on the public API of package storage:
//
//   - GetInfo, WalkInfo, GetSnapshot, CreateSnapshot, CommitActive, Remove,
//     UpdateInfo and IDMap follow containerd's snapshot rules and report each
//     refusal with containerd's errdefs class (NotFound, AlreadyExists,
//     InvalidArgument, FailedPrecondition), leaving the store unchanged;
//   - a WalkInfo callback may write in the walking transaction, and the walk
//     reports each snapshot as the transaction holds it when the walk
//     reaches its name;
//   - ParentIDs lists the immediate parent first, through chains of at least
//     128 layers, and a parent-less active can be rebased on commit;
//   - IDs are unique, kept across commit, and never reused after Remove or
//     after reopening the store;
//   - timestamps come back in UTC, Created <= Updated, and UpdateInfo moves
//     only Updated and the labels;
//   - usage (Size, Inodes) round-trips, including values near math.MaxInt64;
//   - a rolled-back (or failed) transaction leaves no trace, and everything a
//     committed one wrote survives Close and reopening the same root, while
//     other roots stay isolated;
//   - misuse is refused with the storage sentinels (ErrReadOnly,
//     ErrTransactionDone, ErrClosed, ErrNoTransaction, all of class
//     FailedPrecondition) or the context's error, and changes nothing;
//   - WithTransaction commits on nil, rolls back on error (returning it), and
//     never commits a read-only transaction;
//   - concurrent writers on a shared parent leave a consistent store.
func MetaStoreSuite(t *testing.T, name string, open Opener, opts ...Option) {
	cfg := config{skip: map[string]string{}}
	for _, opt := range opts {
		opt(&cfg)
	}
	prefix := t.Name() + "/" + name + "/"
	if len(cfg.skip) > 0 {
		differences.Store(prefix, cfg.skip)
		t.Cleanup(func() { differences.Delete(prefix) })
	}
	for _, sc := range scenarios {
		run(t, name+"/"+sc.name, func(t *testing.T) {
			sc.run(t, open)
		})
	}
}

// Option changes how MetaStoreSuite runs.
type Option func(*config)

type config struct {
	skip map[string]string // subtest path below the suite name -> reason
}

// KnownDifference skips the subtest at path (below the suite's name, with
// Go's subtest spelling, e.g. "CommitActive/refuses/missing_key_is_NotFound")
// and logs why. It is for reference stores known to differ, such as
// containerd's own, so that each difference is named and explained; an
// engine that claims conformance passes with none.
func KnownDifference(path, reason string) Option {
	return func(c *config) { c.skip[path] = reason }
}

// differences holds the KnownDifference options of running suites, by the
// full name prefix of their subtests.
var differences sync.Map

// run is t.Run that honours KnownDifference.
func run(t *testing.T, name string, fn func(t *testing.T)) bool {
	t.Helper()
	return t.Run(name, func(t *testing.T) {
		differences.Range(func(prefix, skip any) bool {
			rest, ok := strings.CutPrefix(t.Name(), prefix.(string))
			if why, known := skip.(map[string]string)[rest]; ok && known {
				t.Skipf("known difference of this store: %s", why)
			}
			return true
		})
		fn(t)
	})
}
