package storage_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	storage "github.com/snapmeta/storage"
)

// This file tests that Check's bounds on its memory change nothing it
// reports: with every bound shrunk to two (batches, lookups kept, verdicts
// kept, IDs per sorted run) a store of a few records takes the paths of a
// large one, and Check must report exactly what it reports unbounded
// (TestCheckReportsEachCorruption compares every corruption so).

// chkCheckShrunk is chkCheck within shrunk bounds; the IDs it spills must
// leave no file behind.
func chkCheckShrunk(t *testing.T, ms storage.MetaStore) []storage.Problem {
	t.Helper()
	restore := storage.ShrinkCheckBounds()
	defer restore()
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	problems := chkCheck(t, ms)
	left, err := os.ReadDir(tmp)
	require.NoError(t, err)
	assert.Empty(t, left, "Check left its spilled IDs behind")
	return problems
}

func TestCheckFindsNothingInACleanStoreWithinShrunkBounds(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			chkBuildChain(t, s.ms)
			assert.Empty(t, chkCheckShrunk(t, s.ms))
		})
	}
}

// Past one run of IDs Check writes them to a temporary file; when none can
// be made, Check fails and says why, rather than judging IDs it did not
// compare.
func TestCheckFailsWhenItCannotSpillIDs(t *testing.T) {
	s := chkFreshBolt(t)
	chkBuildChain(t, s.ms)
	t.Setenv("TMPDIR", t.TempDir()+"/missing")
	_, err := chkCheckErr(s.ms)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "temporary file")
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.True(t, errdefs.IsNotFound(err), "class of %v", err)
}

func chkCheckErr(ms storage.MetaStore) ([]storage.Problem, error) {
	restore := storage.ShrinkCheckBounds()
	defer restore()
	return storage.Check(context.Background(), ms)
}

// On etcd Check reads a batch's records in Txns of at most the server's
// --max-txn-ops Gets, as the store was told it (WithMaxTxnOps); a store
// told a lower limit splits the same reads into more Txns, and must
// report the same.
func TestEtcdCheckReportsTheSameInSmallerTxns(t *testing.T) {
	s := chkFreshEtcd(t)
	ids := chkBuildChain(t, s.ms)
	s.raw(t, func(r chkRaw) { r.deleteLink("layer2", ids["layer2"], ids["work"]) })
	want := chkCheck(t, s.ms)
	require.NotEmpty(t, want)
	few := openEtcd(t, s.root, storage.WithMaxTxnOps(2))
	defer few.Close()
	assert.Equal(t, want, chkCheck(t, few))
}

// Names up to etcd's lookup bound are read in Txns that stay within
// etcd's request limit: 60 records whose missing parents have names of
// 60,000 bytes each are judged, not refused as one oversized Txn.
func TestEtcdCheckReadsLongNamesWithinTheRequestLimit(t *testing.T) {
	s := chkFreshEtcd(t)
	chkUpdate(t, s.ms, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "template", "")
		return err
	})
	var want []chkWant
	s.raw(t, func(r chkRaw) {
		e := r.(*chkEtcdRaw)
		tail := e.record("template").tail
		e.deleteRecord("template")
		for i := range 60 {
			child, parent := fmt.Sprintf("c%02d", i), fmt.Sprintf("p%02d", i)+strings.Repeat("x", 60000)
			e.setRecord(child, chkRecord{ID: uint64(i + 1), Kind: snapshots.KindActive, Parent: parent, tail: tail})
			want = append(want, chkWant{child, "does not exist"})
		}
	})
	chkAssertProblems(t, chkCheck(t, s.ms), want)
}

// Two records that share an ID under one parent call for one index
// entry. Each is judged against it on its own: the one it does not name is
// reported, and when it is missing both are, besides the shared ID.
func TestCheckJudgesEachRecordOfASharedIndexEntry(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			ids := chkBuildChain(t, s.ms)
			s.raw(t, func(r chkRaw) {
				work, view := r.record("work"), r.record("view")
				view.Parent, view.ID, view.Chain = "layer2", work.ID, work.Chain
				r.setRecord("view", view)
				r.deleteLink("layer1", ids["layer1"], ids["view"])
			})
			shared := chkWant{"view", fmt.Sprintf(`ID %d is shared with ["work"]`, ids["work"])}
			chkAssertProblems(t, chkCheck(t, s.ms), []chkWant{shared, {"view", `children index names the child "work"`}})
			s.raw(t, func(r chkRaw) { r.deleteLink("layer2", ids["layer2"], ids["work"]) })
			chkAssertProblems(t, chkCheck(t, s.ms), []chkWant{shared,
				{"view", `missing from the children index of its parent "layer2"`},
				{"work", `missing from the children index of its parent "layer2"`}})
		})
	}
}
