package storage_test

// Tests of which etcd transactions conflict (docs/design.md, "Guarding
// reads (etcd)"): a transaction conflicts exactly when a competing commit
// could have changed what it returned or wrote. Identity reads (ID, kind,
// parent, chain) must not conflict with a change of labels; reads are not
// bounded by etcd's --max-txn-ops; a lost commit hands its retry the fresh
// values of what it read.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// cmOp is the work of one transaction, written with snapshot names only so
// that it can be replayed on another root to compute a serial outcome.
type cmOp struct {
	what     string
	readOnly bool
	fn       func(ctx context.Context) error
}

func cmCreate(key, parent string) cmOp {
	return cmOp{what: fmt.Sprintf("create %s on %s", key, parent), fn: func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent)
		return err
	}}
}

func cmRelabel(name, key, value string) cmOp {
	return cmOp{what: fmt.Sprintf("relabel %s", name), fn: func(ctx context.Context) error {
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: map[string]string{key: value}}, "labels."+key)
		return err
	}}
}

func cmCommit(key, name string) cmOp {
	return cmOp{what: fmt.Sprintf("commit %s as %s", key, name), fn: func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{})
		return err
	}}
}

func cmRemove(name string) cmOp {
	return cmOp{what: "remove " + name, fn: func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, name)
		return err
	}}
}

// cmReplace removes name and commits a new snapshot under the same name on
// parent, in one transaction: same name, new identity.
func cmReplace(name, parent string) cmOp {
	return cmOp{what: "replace " + name, fn: func(ctx context.Context) error {
		if _, _, err := storage.Remove(ctx, name); err != nil {
			return err
		}
		return commitLayer(ctx, name, parent)
	}}
}

func cmReadOnly() cmOp {
	return cmOp{what: "read-only transaction", readOnly: true, fn: func(ctx context.Context) error {
		if _, _, _, err := storage.GetInfo(ctx, "P"); err != nil {
			return err
		}
		if _, err := storage.GetSnapshot(ctx, "A"); err != nil {
			return err
		}
		if _, err := storage.IDMap(ctx); err != nil {
			return err
		}
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	}}
}

// cmGetInfoThenWrite copies the label v of read into the label copied of
// write: what it writes depends on the labels it read.
func cmGetInfoThenWrite(read, write string) cmOp {
	return cmOp{what: fmt.Sprintf("GetInfo %s, write %s", read, write), fn: func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, read)
		if err != nil {
			return err
		}
		_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: write, Labels: map[string]string{"copied": info.Labels["v"]}}, "labels.copied")
		return err
	}}
}

// cmWalkThenWrite creates an active snapshot labelled with a digest of
// everything the walk returned.
func cmWalkThenWrite() cmOp {
	return cmOp{what: "walk, write", fn: func(ctx context.Context) error {
		var lines []string
		err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			lines = append(lines, cmDescribe(info))
			return nil
		})
		if err != nil {
			return err
		}
		sum := sha256.Sum256([]byte(strings.Join(lines, "\n")))
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "summary", "",
			snapshots.WithLabels(map[string]string{"walk": hex.EncodeToString(sum[:8])}))
		return err
	}}
}

// cmGetSnapshotThenWrite reads key's identity and creates newKey on parent,
// labelled with the depth of key's chain.
func cmGetSnapshotThenWrite(key, newKey, parent string) cmOp {
	return cmOp{what: fmt.Sprintf("GetSnapshot %s, create %s", key, newKey), fn: func(ctx context.Context) error {
		s, err := storage.GetSnapshot(ctx, key)
		if err != nil {
			return err
		}
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, newKey, parent,
			snapshots.WithLabels(map[string]string{"depth": strconv.Itoa(len(s.ParentIDs))}))
		return err
	}}
}

// cmSetup builds every case's starting state:
//
//	base0 <- base1 <- P <- sib-c (committed), sib-a, A, B (active)
//	         base1 <- leaf (committed, no children)
//	S, T (committed, no parent, labelled)
//	L00 <- ... <- L09 <- D (active)
func cmSetup(t testing.TB, ms storage.MetaStore) {
	t.Helper()
	update(t, ms, func(ctx context.Context) error {
		for _, l := range [][2]string{{"base0", ""}, {"base1", "base0"}, {"P", "base1"}, {"leaf", "base1"}, {"S", ""}, {"T", ""}} {
			if err := commitLayer(ctx, l[0], l[1]); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, ms, func(ctx context.Context) error {
		if err := commitLayer(ctx, "sib-c", "P"); err != nil {
			return err
		}
		for _, key := range []string{"sib-a", "A", "B"} {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, "P"); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, ms, func(ctx context.Context) error {
		parent := ""
		for i := range 10 {
			name := fmt.Sprintf("L%02d", i)
			if err := commitLayer(ctx, name, parent); err != nil {
				return err
			}
			parent = name
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "D", parent)
		return err
	})
	update(t, ms, func(ctx context.Context) error {
		for name, v := range map[string]string{"S": "s0", "T": "t0", "P": "p0"} {
			if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: map[string]string{"v": v}}); err != nil {
				return err
			}
		}
		return nil
	})
}

// cmDescribe is everything of a snapshot that does not depend on when or
// on which root it was made (no ID, no times).
func cmDescribe(info snapshots.Info) string {
	var labels []string
	for _, k := range slices.Sorted(maps.Keys(info.Labels)) {
		labels = append(labels, k+"="+info.Labels[k])
	}
	return fmt.Sprintf("%s %v parent=%q labels=%s", info.Name, info.Kind, info.Parent, strings.Join(labels, ","))
}

// cmState is the store as a serial history sees it.
func cmState(t testing.TB, ms storage.MetaStore) []string {
	t.Helper()
	var state []string
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		state = nil
		return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			state = append(state, cmDescribe(info))
			return nil
		})
	}))
	return state
}

// cmOpen opens a store that reads etcd itself: these tests are about the
// guards of reads at a revision and the requests a retry sends, and one
// client commits right after the other's commit returned, which a watch
// cache's copy need not have seen yet (an extra conflict).
func cmOpen(t testing.TB, root string) storage.MetaStore {
	return openEtcd(t, root, storage.WithoutWatchCache())
}

// cmCommitOnce runs op in one transaction, committed without retry.
func cmCommitOnce(ms storage.MetaStore, op cmOp) error {
	ctx, tx, err := ms.TransactionContext(context.Background(), !op.readOnly)
	if err != nil {
		return err
	}
	if err := op.fn(ctx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if op.readOnly {
		return tx.Rollback()
	}
	return tx.Commit()
}

type cmOutcome int

const (
	cmNotRun cmOutcome = iota
	cmCommits
	cmConflicts
)

func (o cmOutcome) String() string {
	return map[cmOutcome]string{cmNotRun: "not run", cmCommits: "commits", cmConflicts: "conflicts"}[o]
}

// runConflictCase opens a writable transaction on one client, runs open in
// it, lets a second client commit other, then commits the first and checks
// the outcome, the invariants, and that the state is the one the serial
// order other-then-open (open only if it committed) produces.
func runConflictCase(t *testing.T, open, other cmOp, want cmOutcome) {
	root := uniqueRoot(t)
	client1, client2 := cmOpen(t, root), cmOpen(t, root)
	cmSetup(t, client1)

	ctx, tx, err := client1.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	require.NoError(t, open.fn(ctx), "%s, inside the open transaction", open.what)
	require.NoError(t, cmCommitOnce(client2, other), "%s, by the other client", other.what)
	errCommit := tx.Commit()
	switch want {
	case cmCommits:
		assert.NoError(t, errCommit, "%s must not conflict with %s", open.what, other.what)
	case cmConflicts:
		assert.True(t, errdefs.IsConflict(errCommit), "%s must conflict with %s committed first; got %v", open.what, other.what, errCommit)
	}

	problems, err := storage.Check(context.Background(), client2)
	require.NoError(t, err)
	assert.Empty(t, problems)

	serial := cmOpen(t, uniqueRoot(t))
	cmSetup(t, serial)
	require.NoError(t, cmCommitOnce(serial, other))
	if errCommit == nil {
		require.NoError(t, cmCommitOnce(serial, open), "the open transaction committed, yet no serial order (%s, then %s) allows it", other.what, open.what)
	}
	assert.Equal(t, cmState(t, serial), cmState(t, client2), "the surviving state is the serial one")
}

func TestEtcdConflictMatrix(t *testing.T) {
	createChild := cmCreate("c", "P")
	for _, tc := range []struct {
		name string
		x, y cmOp
		// xOpen: x (the left of the name) runs in the open transaction
		// and y commits first; yOpen: the other way round.
		xOpen, yOpen cmOutcome
	}{
		// Identity reads do not conflict with label changes, nor with
		// writes elsewhere.
		{"child of P vs relabel P", createChild, cmRelabel("P", "v", "p1"), cmCommits, cmCommits},
		{"child of P vs sibling child of P", createChild, cmCreate("c2", "P"), cmCommits, cmCommits},
		{"child of P vs commit of a sibling", createChild, cmCommit("sib-a", "sib-a-done"), cmCommits, cmCommits},
		{"child of P vs removal of a sibling", createChild, cmRemove("sib-c"), cmCommits, cmCommits},
		{"child of P vs read-only transaction", createChild, cmReadOnly(), cmCommits, cmNotRun},
		{"child of P vs relabel of P's ancestor", createChild, cmRelabel("base0", "v", "b1"), cmCommits, cmCommits},
		{"commit of A on P vs relabel P", cmCommit("A", "A-done"), cmRelabel("P", "v", "p1"), cmCommits, cmCommits},
		{"relabel S vs relabel T", cmRelabel("S", "v", "s1"), cmRelabel("T", "v", "t1"), cmCommits, cmCommits},
		{"GetSnapshot of deep D, create on L09 vs relabel L09", cmGetSnapshotThenWrite("D", "deep-child", "L09"), cmRelabel("L09", "v", "l1"), cmCommits, cmCommits},
		{"GetSnapshot of deep D, create on L09 vs relabel L00", cmGetSnapshotThenWrite("D", "deep-child", "L09"), cmRelabel("L00", "v", "l1"), cmCommits, cmCommits},
		{"GetSnapshot of A, write vs relabel A", cmGetSnapshotThenWrite("A", "w", ""), cmRelabel("A", "v", "a1"), cmCommits, cmCommits},
		// Committing or removing A uses A's identity only; a relabel of A
		// writes A back, so it must lose to either.
		{"commit of A vs relabel A", cmCommit("A", "A-done"), cmRelabel("A", "v", "a1"), cmCommits, cmConflicts},
		{"removal of A vs relabel A", cmRemove("A"), cmRelabel("A", "v", "a1"), cmCommits, cmConflicts},

		// What was read, or written, changed.
		{"removal of leaf vs child of leaf", cmRemove("leaf"), cmCreate("c", "leaf"), cmConflicts, cmConflicts},
		{"child of leaf vs replacement of leaf", cmCreate("c", "leaf"), cmReplace("leaf", "base1"), cmConflicts, cmConflicts},
		{"create k vs create k", cmCreate("k", ""), cmCreate("k", "P"), cmConflicts, cmConflicts},
		{"commit of A as N vs commit of B as N", cmCommit("A", "N"), cmCommit("B", "N"), cmConflicts, cmConflicts},
		{"create N vs commit of A as N", cmCreate("N", "P"), cmCommit("A", "N"), cmConflicts, cmConflicts},
		{"relabel S vs relabel S", cmRelabel("S", "x", "1"), cmRelabel("S", "y", "1"), cmConflicts, cmConflicts},
		{"GetInfo S, write vs relabel S", cmGetInfoThenWrite("S", "T"), cmRelabel("S", "v", "s1"), cmConflicts, cmCommits},
		{"walk, write vs relabel S", cmWalkThenWrite(), cmRelabel("S", "v", "s1"), cmConflicts, cmCommits},
		{"walk, write vs create", cmWalkThenWrite(), cmCreate("new", "P"), cmConflicts, cmCommits},
		{"walk, write vs removal", cmWalkThenWrite(), cmRemove("sib-c"), cmConflicts, cmCommits},
		{"commit of A vs removal of A", cmCommit("A", "A-done"), cmRemove("A"), cmConflicts, cmConflicts},
		{"GetSnapshot of A, write vs removal of A", cmGetSnapshotThenWrite("A", "w", ""), cmRemove("A"), cmConflicts, cmCommits},
		{"GetSnapshot of A, write vs commit of A", cmGetSnapshotThenWrite("A", "w", ""), cmCommit("A", "A-done"), cmConflicts, cmCommits},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, o := range []struct {
				name        string
				open, other cmOp
				want        cmOutcome
			}{
				{"left inside", tc.x, tc.y, tc.xOpen},
				{"right inside", tc.y, tc.x, tc.yOpen},
			} {
				if o.want == cmNotRun {
					continue
				}
				t.Run(fmt.Sprintf("%s %s", o.name, o.want), func(t *testing.T) {
					runConflictCase(t, o.open, o.other, o.want)
				})
			}
		})
	}
}

// cmChain commits layers prefix000 .. prefix<n-1>, each on the one before,
// 20 to a transaction, and returns their names, base first.
func cmChain(t testing.TB, ms storage.MetaStore, prefix string, n int) []string {
	t.Helper()
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s%03d", prefix, i)
	}
	for i := 0; i < n; i += 20 {
		update(t, ms, func(ctx context.Context) error {
			for j := i; j < min(i+20, n); j++ {
				parent := ""
				if j > 0 {
					parent = names[j-1]
				}
				if err := commitLayer(ctx, names[j], parent); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return names
}

// cmReadAncestors is erofs's Prepare: GetInfo of every ancestor, following
// parents from top.
func cmReadAncestors(ctx context.Context, top string) (int, error) {
	n := 0
	for name := top; name != ""; n++ {
		_, info, _, err := storage.GetInfo(ctx, name)
		if err != nil {
			return n, err
		}
		name = info.Parent
	}
	return n, nil
}

func TestEtcdWritableTransactionReadsTwoHundredAncestors(t *testing.T) {
	ctx := context.Background()
	// The server runs with etcd's default --max-txn-ops: 128.
	cmps := make([]clientv3.Cmp, 129)
	for i := range cmps {
		cmps[i] = clientv3.Compare(clientv3.Version(fmt.Sprintf("%s/probe/%d", t.Name(), i)), "=", 0)
	}
	_, err := etcdServer(t).Client(t).Txn(ctx).If(cmps...).Commit()
	require.ErrorIs(t, err, rpctypes.ErrTooManyOps, "the server must refuse 129 compares")

	root := uniqueRoot(t)
	ms, other := cmOpen(t, root), cmOpen(t, root)
	chain := cmChain(t, ms, "L", 200)
	top := chain[len(chain)-1]

	for _, tc := range []struct {
		name    string
		between cmOp // committed by another client between the reads and the commit
		want    cmOutcome
	}{
		{"nothing in between commits", cmOp{}, cmCommits},
		{"a sibling created in between commits", cmCreate("sibling", top), cmCommits},
		// The labels of every ancestor were read: a relabel must conflict.
		{"a relabel of an ancestor in between conflicts", cmRelabel(chain[100], "v", "changed"), cmConflicts},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "child-" + strconv.Itoa(int(rootSeq.Add(1)))
			tctx, tx, err := ms.TransactionContext(ctx, true)
			require.NoError(t, err)
			n, err := cmReadAncestors(tctx, top)
			require.NoError(t, err)
			require.Equal(t, 200, n)
			_, err = storage.CreateSnapshot(tctx, snapshots.KindActive, key, top)
			require.NoError(t, err)
			if tc.between.fn != nil {
				require.NoError(t, cmCommitOnce(other, tc.between))
			}
			err = tx.Commit()
			var got storage.Snapshot
			errGet := other.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
				got, err = storage.GetSnapshot(ctx, key)
				return err
			})
			switch tc.want {
			case cmCommits:
				require.NoError(t, err, "200 reads and one create must commit")
				require.NoError(t, errGet)
				assert.Len(t, got.ParentIDs, 200)
			case cmConflicts:
				assert.True(t, errdefs.IsConflict(err), "got %v", err)
				assert.True(t, errdefs.IsNotFound(errGet), "a lost commit applies nothing: %v", errGet)
			}
			problems, err := storage.Check(ctx, other)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}

	t.Run("a walk of 300 snapshots, then commits", func(t *testing.T) {
		for _, tc := range []struct {
			name    string
			between cmOp
			want    cmOutcome
		}{
			{"nothing in between commits", cmOp{}, cmCommits},
			// The walk returned every record: a new one changes its answer.
			{"a create in between conflicts", cmCreate("late", ""), cmConflicts},
		} {
			t.Run(tc.name, func(t *testing.T) {
				root := uniqueRoot(t)
				ms, other := cmOpen(t, root), cmOpen(t, root)
				for i := 0; i < 290; i += 29 {
					update(t, ms, func(ctx context.Context) error {
						for j := i; j < i+29; j++ {
							if err := commitLayer(ctx, fmt.Sprintf("W%03d", j), ""); err != nil {
								return err
							}
						}
						return nil
					})
				}
				update(t, ms, func(ctx context.Context) error {
					for i := range 10 {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("act%d", i), "W000"); err != nil {
							return err
						}
					}
					return nil
				})

				tctx, tx, err := ms.TransactionContext(ctx, true)
				require.NoError(t, err)
				walked := 0
				require.NoError(t, storage.WalkInfo(tctx, func(context.Context, snapshots.Info) error { walked++; return nil }))
				require.Equal(t, 300, walked)
				for i := range 10 {
					_, err := storage.CommitActive(tctx, fmt.Sprintf("act%d", i), fmt.Sprintf("done%d", i), snapshots.Usage{})
					require.NoError(t, err)
				}
				if tc.between.fn != nil {
					require.NoError(t, cmCommitOnce(other, tc.between))
				}
				err = tx.Commit()
				switch tc.want {
				case cmCommits:
					assert.NoError(t, err)
				case cmConflicts:
					assert.True(t, errdefs.IsConflict(err), "got %v", err)
				}
				problems, err := storage.Check(ctx, other)
				require.NoError(t, err)
				assert.Empty(t, problems)
			})
		}
	})
}

func TestEtcdRetryTakesTheReadsOfTheLostCommit(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		// work runs in the callback; it reads, then writes.
		work func(ctx context.Context) error
		// race is what the other client commits during the first attempt,
		// after the reads: a genuine conflict.
		race cmOp
		// check sees the outcome: the retry used the fresh values.
		check func(t *testing.T, state []string)
	}{
		{
			name: "GetInfo of S, then a child of P with S's label; S relabelled",
			work: func(ctx context.Context) error {
				_, info, _, err := storage.GetInfo(ctx, "S")
				if err != nil {
					return err
				}
				_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "P",
					snapshots.WithLabels(map[string]string{"copied": info.Labels["v"]}))
				return err
			},
			race: cmRelabel("S", "v", "s1"),
			check: func(t *testing.T, state []string) {
				assert.Contains(t, state, `child Active parent="P" labels=copied=s1`)
			},
		},
		{
			name: "erofs-like: GetInfo of every ancestor, then a child; an ancestor relabelled",
			work: func(ctx context.Context) error {
				n, err := cmReadAncestors(ctx, "L09")
				if err != nil {
					return err
				}
				_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "L09",
					snapshots.WithLabels(map[string]string{"ancestors": strconv.Itoa(n)}))
				return err
			},
			race: cmRelabel("L03", "v", "l1"),
			check: func(t *testing.T, state []string) {
				assert.Contains(t, state, `child Active parent="L09" labels=ancestors=10`)
				assert.Contains(t, state, `L03 Committed parent="L02" labels=v=l1`)
			},
		},
		{
			name: "UpdateInfo of S lost to another UpdateInfo of S",
			work: cmRelabel("S", "x", "1").fn,
			race: cmRelabel("S", "y", "1"),
			check: func(t *testing.T, state []string) {
				assert.Contains(t, state, `S Committed parent="" labels=v=s0,x=1,y=1`)
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int64
			root := uniqueRoot(t)
			ms := openEtcd(t, root, storage.WithoutWatchCache(), storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: &n} }))
			other := cmOpen(t, root)
			// The setup runs on the counted store, so its block of IDs is
			// reserved before counting starts.
			cmSetup(t, ms)

			var starts []int64 // the count when each attempt began
			n.Store(0)
			err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				starts = append(starts, n.Load())
				if err := tc.work(ctx); err != nil {
					return err
				}
				if len(starts) == 1 {
					require.NoError(t, cmCommitOnce(other, tc.race))
				}
				return nil
			})
			require.NoError(t, err)
			total := n.Load()
			require.Len(t, starts, 2, "the first attempt loses, the retry wins")
			first, retry := starts[1]-starts[0], total-starts[1]
			t.Logf("round trips: first attempt %d (reads and the lost commit), retry %d", first, retry)
			assert.LessOrEqual(t, retry, int64(1), "the retry re-reads nothing the lost commit returned: its commit only")
			tc.check(t, cmState(t, other))
			problems, err := storage.Check(ctx, other)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}
