package storage

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The etcd calls of host scopes (hosts.go, share.go, takeover.go): views
// of other hosts' scopes in the same transaction, the lock keys, and the
// shared layers with their content index. No rule lives here.

func (t *etcdTx) scopeHost() (string, bool) { return t.keys.owner, t.keys.owner != "" }

func (t *etcdTx) inHost(host string) engineTx { return t.view(t.e.keys.forHost(host)) }

func (t *etcdTx) hostAlive(ctx context.Context, host string) (bool, error) {
	v, err := t.readKey(ctx, t.e.keys.lock(host))
	return v != nil, err
}

func (t *etcdTx) forgetHost(host string) error {
	t.write(t.e.keys.host(host), nil)
	return nil
}

func (t *etcdTx) getLayer(ctx context.Context, id uint64) (*layer, error) {
	v, err := t.readKey(ctx, t.e.keys.layer(id))
	if err != nil || v == nil {
		return nil, err
	}
	l, err := decodeLayer(v)
	if err != nil {
		return nil, fmt.Errorf("shared layer %d: %w", id, err)
	}
	return l, nil
}

func (t *etcdTx) putLayer(id uint64, l *layer) error {
	t.write(t.e.keys.layer(id), encodeLayer(l))
	t.write(t.e.keys.contentPrefix(l.Content)+formatID(id), binary.AppendUvarint(nil, l.parentID()))
	return nil
}

func (t *etcdTx) deleteLayer(id uint64, l *layer) error {
	t.write(t.e.keys.layer(id), nil)
	t.write(t.e.keys.contentPrefix(l.Content)+formatID(id), nil)
	return nil
}

// layersByContent reads the content index entries of key, as the
// transaction holds them; the whole prefix is guarded, so a layer indexed
// under key since makes the commit conflict. A removed layer is seen by
// the guard of its record, which every use of an entry reads.
func (t *etcdTx) layersByContent(ctx context.Context, key string) ([]contentEntry, error) {
	prefix := t.e.keys.contentPrefix(key)
	end := clientv3.GetPrefixRangeEnd(prefix)
	t.readRange(prefix, end)
	found := map[string][]byte{}
	err := t.scanRange(ctx, prefix, end, func(kv *mvccpb.KeyValue) error {
		found[string(kv.Key)] = kv.Value
		return nil
	})
	if err != nil {
		return nil, err
	}
	for k, v := range t.writes {
		if strings.HasPrefix(k, prefix) {
			found[k] = v
		}
	}
	var out []contentEntry
	for _, k := range slices.Sorted(maps.Keys(found)) {
		v := found[k]
		if v == nil {
			continue
		}
		id, err := strconv.ParseUint(k[len(prefix):], 10, 64)
		pid, n := binary.Uvarint(v)
		if err != nil || formatID(id) != k[len(prefix):] || n != len(v) {
			return nil, fmt.Errorf("content index key %q: %w", k, ErrCorrupt)
		}
		out = append(out, contentEntry{id: id, parentID: pid})
	}
	return out, nil
}

// readKey returns the value of key as the transaction holds it, nil when
// absent, and guards it by mod revision.
func (t *etcdTx) readKey(ctx context.Context, key string) ([]byte, error) {
	if v, ok := t.writes[key]; ok {
		return v, nil
	}
	if v, known := t.known(key, true); known {
		return v, nil
	}
	rs, err := t.readMany(ctx, []clientv3.Op{clientv3.OpGet(key, t.readOpts()...)})
	if err != nil {
		return nil, err
	}
	var kv *mvccpb.KeyValue
	if len(rs[0].Kvs) > 0 {
		kv = rs[0].Kvs[0]
	}
	t.reads.note(key, readOf(kv), true)
	return readOf(kv).value, nil
}

func (t *etcdTx) unscoped() engineTx { return t.view(t.e.keys.inScope(t.e.keys.prefix)) }

func (t *etcdTx) rootHosts(ctx context.Context) ([]string, error) {
	prefix := t.e.keys.prefix + KeyEtcdHosts + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	t.readRange(prefix, end)
	var hosts []string
	err := t.scanRange(ctx, prefix, end, func(kv *mvccpb.KeyValue) error {
		name := string(kv.Key[len(prefix):])
		if strings.HasSuffix(name, "/"+KeyLock) {
			return nil
		}
		if validHost(name) != nil {
			return fmt.Errorf("hosts key %q is no host's: %w", kv.Key, ErrCorrupt)
		}
		hosts = append(hosts, name)
		return nil
	})
	return hosts, err
}

// scopeOwners reads one key per scope: after the first key of a scope it
// skips to the end of that scope's prefix.
func (t *etcdTx) scopeOwners(ctx context.Context) ([]string, error) {
	prefix := t.e.keys.prefix + KeyEtcdScopes + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	t.readRange(prefix, end)
	var owners []string
	for from := prefix; ; {
		resp, err := t.readOne(ctx, clientv3.OpGet(from, t.readOpts(clientv3.WithRange(end), clientv3.WithLimit(1), clientv3.WithKeysOnly())...))
		if err != nil {
			return nil, err
		}
		if len(resp.Kvs) == 0 {
			return owners, nil
		}
		host, _, _ := strings.Cut(string(resp.Kvs[0].Key[len(prefix):]), "/")
		owners = append(owners, host)
		from = clientv3.GetPrefixRangeEnd(prefix + host + "/")
	}
}

func (t *etcdTx) scanLayers(ctx context.Context, fn func(id uint64, l *layer, err error) error) error {
	prefix := t.e.keys.prefix + KeyEtcdLayers + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	t.readRange(prefix, end)
	return t.scanRange(ctx, prefix, end, func(kv *mvccpb.KeyValue) error {
		id, err := strconv.ParseUint(string(kv.Key[len(prefix):]), 10, 64)
		if err != nil || formatID(id) != string(kv.Key[len(prefix):]) {
			return fn(0, nil, fmt.Errorf("layer key %q: %w", kv.Key, ErrCorrupt))
		}
		l, err := decodeLayer(kv.Value)
		return fn(id, l, err)
	})
}

func (t *etcdTx) scanContent(ctx context.Context, fn func(key string, e contentEntry, err error) error) error {
	prefix := t.e.keys.prefix + KeyEtcdContent + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	t.readRange(prefix, end)
	return t.scanRange(ctx, prefix, end, func(kv *mvccpb.KeyValue) error {
		rest := string(kv.Key[len(prefix):])
		i := strings.LastIndexByte(rest, '/')
		var key string
		var id uint64
		ok := i >= 0
		if ok {
			var err error
			key, ok = unescapeName(rest[:i])
			id, err = strconv.ParseUint(rest[i+1:], 10, 64)
			ok = ok && err == nil && formatID(id) == rest[i+1:]
		}
		pid, n := binary.Uvarint(kv.Value)
		if !ok || n != len(kv.Value) {
			return fn(rest, contentEntry{}, fmt.Errorf("content index key %q: %w", kv.Key, ErrCorrupt))
		}
		return fn(key, contentEntry{id: id, parentID: pid}, nil)
	})
}
