package testsuite_test

import (
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/testsuite"
)

// TestMain fails the run if a goroutine outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestBoltMetaStoreSuite runs the conformance suite against the bbolt engine,
// one database file per root directory.
func TestBoltMetaStoreSuite(t *testing.T) {
	testsuite.MetaStoreSuite(t, "bolt", func(_ testing.TB, root string) (storage.MetaStore, error) {
		return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
	})
}

// TestBoltParallelMetaStoreSuite runs the conformance suite against the
// bbolt engine with parallel callbacks.
func TestBoltParallelMetaStoreSuite(t *testing.T) {
	testsuite.MetaStoreSuite(t, "bolt-parallel", func(_ testing.TB, root string) (storage.MetaStore, error) {
		return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"), storage.WithParallelCallbacks())
	})
}
