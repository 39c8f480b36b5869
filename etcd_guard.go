package storage

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// What an etcd transaction read, and the compares that keep its answers
// true. A commit conflicts exactly when a competing commit could have
// changed what the transaction returned or wrote:
//
//   - a record's identity (ID, kind, parent, chain) never changes while its
//     key lives, so a read of identity only is guarded by the key's create
//     revision: a relabel does not touch it, a removal or a new record
//     under the name does (a removal and a new record in one Txn touch a
//     marker instead, see deletionMarkers);
//   - a read that used labels, times or usage is guarded by the key's mod
//     revision;
//   - a walk or an empty children check is guarded as a range that must not
//     have changed since the read revision.
//
// etcd bounds the compares of one Txn (--max-txn-ops). Past that bound, the
// point reads of snapshot records are merged into range compares (see
// mergedGuards), which stay sound but may conflict with writes near what was
// read; so reads are unbounded, and only writes are limited by the server.

// keyRead is what a transaction read of one key, at its read revision.
type keyRead struct {
	createRev int64 // 0: the key was absent
	modRev    int64
	value     []byte
	// whole is set once an answer used more than the key's identity; only
	// then does a change of its value matter.
	whole bool
}

// readOf returns the read of kv, nil meaning an absent key.
func readOf(kv *mvccpb.KeyValue) keyRead {
	if kv == nil {
		return keyRead{}
	}
	return keyRead{createRev: kv.CreateRevision, modRev: kv.ModRevision, value: kv.Value}
}

// cmp is the compare that holds while the answers read from key hold.
func (r keyRead) cmp(key string) clientv3.Cmp {
	if r.whole {
		return clientv3.Compare(clientv3.ModRevision(key), "=", r.modRev)
	}
	return clientv3.Compare(clientv3.CreateRevision(key), "=", r.createRev)
}

// readSet holds the point reads of a transaction by key.
type readSet map[string]keyRead

// note records a read of key; a key read before keeps its first read (all
// reads are at one revision), and whole only ever becomes set.
func (rs readSet) note(key string, r keyRead, whole bool) {
	if prev, ok := rs[key]; ok {
		r = prev
	}
	r.whole = r.whole || whole
	rs[key] = r
}

// rangeSet holds the ranges a transaction read in full, start -> end.
type rangeSet map[string]string

func (rg rangeSet) cmps(rev int64) []clientv3.Cmp {
	var cmps []clientv3.Cmp
	for _, start := range slices.Sorted(maps.Keys(rg)) {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(start), "<", rev+1).WithRange(rg[start]))
	}
	return cmps
}

// guards returns the compares of every read of a transaction at revision
// rev, at most budget of them, or ErrTooLarge. records is the prefix of the
// snapshot records, whose point reads may be merged; markers are the
// deletion markers of keys.go.
func guards(reads readSet, ranges rangeSet, rev int64, budget int, records string, markers deletionMarkers) ([]clientv3.Cmp, error) {
	cmps := ranges.cmps(rev)
	var mergeable []string
	identity := false
	for _, k := range slices.Sorted(maps.Keys(reads)) {
		if r := reads[k]; strings.HasPrefix(k, records) {
			mergeable = append(mergeable, k)
			identity = identity || (!r.whole && r.createRev != 0)
			continue
		}
		cmps = append(cmps, reads[k].cmp(k))
	}
	if identity {
		// A record replaced in one Txn keeps its key's create revision.
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(markers.replaced), "<", rev+1))
	}
	if len(cmps)+len(mergeable) <= budget {
		for _, k := range mergeable {
			cmps = append(cmps, reads[k].cmp(k))
		}
		return cmps, nil
	}
	// Two compares are kept for the deletion markers.
	groups := budget - len(cmps) - 2
	if groups < 1 {
		return nil, fmt.Errorf("%d reads need more than the %d compares etcd accepts per transaction: %w", len(cmps)+len(mergeable), budget, ErrTooLarge)
	}
	return append(cmps, mergedGuards(reads, mergeable, groups, rev, markers)...), nil
}

// mergedGuards guards the sorted keys in at most groups range compares, and
// the deletions a range compare cannot see through the deletion markers.
//
// A range [first, last] of keys read only for identity holds while no key
// in it was created (or created again) since rev; one with a key read whole
// holds while no key in it changed since rev. A key removed since rev
// leaves no trace in a range, so the marker its removal touches is guarded
// too: removals of committed records touch one, of actives and views the
// other, and committed ancestors, what long read sets are made of, are
// rarely removed.
func mergedGuards(reads readSet, keys []string, groups int, rev int64, markers deletionMarkers) []clientv3.Cmp {
	size := (len(keys) + groups - 1) / groups
	var cmps []clientv3.Cmp
	var guardCommitted, guardOthers bool
	for len(keys) > 0 {
		n := min(size, len(keys))
		chunk := keys[:n]
		keys = keys[n:]
		whole := false
		for _, k := range chunk {
			r := reads[k]
			whole = whole || r.whole
			if r.createRev == 0 {
				continue
			}
			if kindOfValue(r.value) == snapshots.KindCommitted {
				guardCommitted = true
			} else {
				guardOthers = true
			}
		}
		target := clientv3.CreateRevision(chunk[0])
		if whole {
			target = clientv3.ModRevision(chunk[0])
		}
		cmps = append(cmps, clientv3.Compare(target, "<", rev+1).WithRange(chunk[n-1]+"\x00"))
	}
	// Removals by clients older than the second marker touch only the
	// first, whatever the kind: it is watched whenever a marker is.
	if guardCommitted || guardOthers {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(markers.committed), "<", rev+1))
	}
	if guardOthers {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(markers.others), "<", rev+1))
	}
	return cmps
}

// deletionMarkers are the keys a removal of a record touches, so that range
// guards see it (see keys.go).
type deletionMarkers struct {
	committed string // touched by removals of committed records
	others    string // touched by removals of actives and views
	// replaced is touched when one Txn removes a record and writes another
	// under its name: etcd sees a put, which keeps the key's create
	// revision, so guards of identity watch this key too. Such a Txn is
	// rare (a name removed and created again in one transaction).
	replaced string
}

// forKind returns the marker a removal of a record of kind touches.
func (m deletionMarkers) forKind(k snapshots.Kind) string {
	if k == snapshots.KindCommitted {
		return m.committed
	}
	return m.others
}

// kindOfValue returns the kind of an encoded record, KindUnknown when it
// does not decode (its removal then touches the marker of actives, and
// range guards treat it so).
func kindOfValue(v []byte) snapshots.Kind {
	r, err := decodeRecord(v)
	if err != nil {
		return snapshots.KindUnknown
	}
	return r.Kind
}

// lostCommit is the error of a commit that lost a race. It carries the
// transaction's point reads as etcd held them when the commit failed (read
// in the commit's Else branch), so that a retry starts from them instead
// of reading them again.
type lostCommit struct {
	e    *etcdEngine
	rev  int64
	kvs  map[string]*mvccpb.KeyValue // nil: absent
	read int64                       // the lost transaction's read revision
}

func (l *lostCommit) Error() string {
	return fmt.Sprintf("snapshot metadata changed since revision %d: %v", l.read, ErrConflict)
}

func (l *lostCommit) Unwrap() error { return ErrConflict }

// refetchOps reads again, in a commit's Else branch, the keys a retry is
// most likely to read: the transaction's point reads, first first, at most
// limit.
func refetchOps(reads readSet, first string, limit int) (keys []string, ops []clientv3.Op) {
	if _, ok := reads[first]; ok {
		keys = append(keys, first)
	}
	for _, k := range slices.Sorted(maps.Keys(reads)) {
		if len(keys) == limit {
			break
		}
		if k != first {
			keys = append(keys, k)
		}
	}
	for _, k := range keys {
		ops = append(ops, clientv3.OpGet(k))
	}
	return keys, ops
}
