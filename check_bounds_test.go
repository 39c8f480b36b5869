package storage_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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

// A temporary file that takes the IDs but cannot be written, or is
// written but cannot be read back, fails Check with class Internal; Check
// never judges IDs it could not read back, and removes the file.
func TestCheckFailsWhenItsSpilledIDsCannotBeWrittenOrReadBack(t *testing.T) {
	for _, tc := range []struct {
		name string
		flag int // how the spill file is opened: the other direction fails
		says string
	}{
		{"writing fails", os.O_RDONLY, "spilling the store's IDs"},
		{"reading back fails", os.O_WRONLY, "reading back the store's IDs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := chkFreshBolt(t)
			chkBuildChain(t, s.ms)
			path := filepath.Join(t.TempDir(), "ids")
			restore := storage.SetIDSpillFile(func() (*os.File, error) {
				return os.OpenFile(path, tc.flag|os.O_CREATE, 0o600)
			})
			defer restore()
			problems, err := chkCheckErr(s.ms)
			require.Error(t, err)
			assert.Nil(t, problems)
			assert.Contains(t, err.Error(), tc.says)
			assert.True(t, errdefs.IsInternal(err), "class of %v", err)
			assert.NoFileExists(t, path, "Check left its spill file behind")
		})
	}
}

// failingKV fails one request, as a server that did not answer it would
// (gRPC Unavailable): the one that finds its countdown at zero.
type failingKV struct {
	clientv3.KV
	countdown *atomic.Int64
}

var errInjectedUnavailable = status.Error(codes.Unavailable, "injected: etcd went away")

func (f failingKV) spend() error {
	if f.countdown.Add(-1) == -1 {
		return errInjectedUnavailable
	}
	return nil
}

func (f failingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if err := f.spend(); err != nil {
		return nil, err
	}
	return f.KV.Get(ctx, key, opts...)
}

func (f failingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	if err := f.spend(); err != nil {
		return clientv3.OpResponse{}, err
	}
	return f.KV.Do(ctx, op)
}

func (f failingKV) GetStream(ctx context.Context, key string, opts ...clientv3.OpOption) (clientv3.GetStreamChan, error) {
	if err := f.spend(); err != nil {
		return nil, err
	}
	return f.KV.GetStream(ctx, key, opts...)
}

func (f failingKV) Txn(ctx context.Context) clientv3.Txn {
	return hookedTxn{Txn: f.KV.Txn(ctx), beforeCommit: f.spend}
}

// Check on etcd needs every request it sends: when one fails, at any point
// of it (the scan, a batch's parents, the children index, the scans for
// shared IDs), Check fails with class Unavailable and reports nothing,
// rather than a list judged on reads it did not get. Within
// shrunk bounds, on a store whose index lacks an entry and whose records
// share an ID, so that every path of Check sends requests.
func TestEtcdCheckFailsWholeWhenAnyRequestFails(t *testing.T) {
	s := chkFreshEtcd(t)
	ids := chkBuildChain(t, s.ms)
	s.raw(t, func(r chkRaw) {
		r.deleteLink("layer2", ids["layer2"], ids["work"])
		view := r.record("view")
		view.ID = ids["rb"]
		r.setRecord("view", view)
	})
	var countdown atomic.Int64
	countdown.Store(math.MaxInt64)
	ms := openEtcd(t, s.root, storage.WithoutWatchCache(), storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV {
		return failingKV{KV: kv, countdown: &countdown}
	}))
	restore := storage.ShrinkCheckBounds()
	defer restore()
	t.Setenv("TMPDIR", t.TempDir())

	want, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	require.NotEmpty(t, want)
	// Counted on a second Check: the first also learns what a store
	// learns once.
	countdown.Store(math.MaxInt64)
	_, err = storage.Check(context.Background(), ms)
	require.NoError(t, err)
	sent := math.MaxInt64 - countdown.Load()
	require.Greater(t, sent, int64(3), "Check sent too few requests to fail it midway")

	for answered := range sent {
		countdown.Store(answered)
		problems, err := storage.Check(context.Background(), ms)
		if assert.Error(t, err, "request %d of %d failed", answered+1, sent) {
			assert.ErrorIs(t, err, errInjectedUnavailable)
			assert.True(t, errdefs.IsUnavailable(err), "class of %v", err)
		}
		assert.Nil(t, problems, "request %d of %d failed", answered+1, sent)
	}
	countdown.Store(sent)
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Equal(t, want, problems)
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
