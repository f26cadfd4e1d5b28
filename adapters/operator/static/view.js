// The live view: renders the snapshot fetched at load, then every snapshot the server sends
// on the event stream. Vanilla JS, no dependency; text goes in through textContent only.
(() => {
  'use strict';
  const prefix = document.body.dataset.prefix;
  // Request URLs are built from location.origin, never resolved against the page's own URL:
  // a page opened as http://user:password@host/... would otherwise hand those credentials to
  // every request URL, and browsers refuse such requests (the cached login is used instead).
  const base = location.origin + prefix;
  let selected = null;
  let latest = null;
  let source = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key.startsWith('data-')) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function kw(value) {
    return value === null || value === undefined ? '—' : value.toFixed(1);
  }

  function td(value, cls) {
    return el('td', { class: cls }, value);
  }

  function reportUrl(id, format, inline) {
    return base + '/reports/' + encodeURIComponent(id) + '.' + format + (inline ? '?inline=1' : '');
  }

  function reportLinks(id) {
    return el('td', { class: 'text' },
      el('a', { href: reportUrl(id, 'svg', true), target: '_blank', rel: 'noopener' }, 'svg'), ' ',
      el('a', { href: reportUrl(id, 'csv', false), download: id + '.csv' }, 'csv'));
  }

  function select(groupId) {
    selected = selected === groupId ? null : groupId;
    if (latest) render(latest);
  }

  // ------------------------------------------------------------------ topology
  function treeItem(node, groups) {
    const g = groups[node.group_id];
    const label = el('div', {
      class: 'node' + (node.group_id === selected ? ' selected' : ''),
      'data-group': node.group_id,
      title: node.group_id,
    },
    el('span', null, el('span', { class: 'level' }, node.level.replace('_', ' ') + ' '), node.name),
    el('span', { class: 'kw' }, g ? kw(g.power_kw) + ' kW' : ''));
    label.addEventListener('click', () => select(node.group_id));
    const item = el('li', null, label);
    if (node.children.length) {
      item.append(el('ul', null, ...node.children.map((c) => treeItem(c, groups))));
    }
    return item;
  }

  function renderTree(s) {
    $('tree').replaceChildren(...s.tree.map((n) => treeItem(n, s.groups)));
    const others = s.other_groups.map((id) => treeItem(
      { group_id: id, level: 'group', name: id, children: [] }, s.groups));
    $('other-groups').replaceChildren(...others);
    $('other-groups-title').hidden = others.length === 0;
  }

  // ------------------------------------------------------------------ groups
  function band(g) {
    const values = [g.power_kw, g.power_lower_kw, g.power_upper_kw, g.baseline_kw]
      .filter((v) => v !== null && v !== undefined);
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    const pad = Math.max((hi - lo) * 0.1, 0.5);
    lo -= pad;
    hi += pad;
    const at = (v) => ((v - lo) / (hi - lo)) * 100 + '%';
    const box = el('div', { class: 'band', title: 'estimate band, estimate and baseline' });
    if (g.power_lower_kw !== null && g.power_upper_kw !== null) {
      const range = el('span', { class: 'range' });
      range.style.left = at(g.power_lower_kw);
      range.style.width = ((g.power_upper_kw - g.power_lower_kw) / (hi - lo)) * 100 + '%';
      box.append(range);
    }
    if (g.baseline_kw !== null) {
      const mark = el('span', { class: 'base' });
      mark.style.left = at(g.baseline_kw);
      box.append(mark);
    }
    const est = el('span', { class: 'est' });
    est.style.left = at(g.power_kw);
    box.append(est);
    return box;
  }

  function renderGroups(s) {
    const rows = Object.values(s.groups).map((g) => {
      const interval = g.power_lower_kw === null ? '—'
        : kw(g.power_lower_kw) + ' … ' + kw(g.power_upper_kw);
      const row = el('tr', { 'data-group': g.group_id, class: g.group_id === selected ? 'selected' : '' },
        td(g.group_id, 'text'),
        td(kw(g.power_kw), 'power'),
        td(interval, 'interval'),
        el('td', null, band(g)),
        td(kw(g.baseline_kw), 'baseline'),
        td(kw(g.measured_kw), 'measured'),
        td(kw(g.setpoint_kw), 'setpoint'),
        td(g.devices_reporting + ' / ' + g.devices_total
          + (g.devices_estimated ? ' (' + g.devices_estimated + ' est.)' : ''), 'devices'),
        td(g.quality, 'q-' + g.quality));
      row.addEventListener('click', () => select(g.group_id));
      return row;
    });
    $('groups').tBodies[0].replaceChildren(...rows);
  }

  function renderSelected(s) {
    const g = selected && s.groups[selected];
    $('selected').hidden = !g;
    if (!g) return;
    $('selected-id').textContent = g.group_id;
    const pairs = [
      ['power', kw(g.power_kw) + ' kW (' + g.method + ')'],
      ['estimate band', g.power_lower_kw === null ? '—'
        : kw(g.power_lower_kw) + ' … ' + kw(g.power_upper_kw) + ' kW at '
          + Math.round((g.confidence || 0) * 100) + ' %'],
      ['baseline', kw(g.baseline_kw) + ' kW'],
      ['measured', kw(g.measured_kw) + ' kW'],
      ['commands', g.active_commands.join(', ') || 'none'],
    ];
    const classes = s.availability_by_group[g.group_id] || {};
    for (const [cls, a] of Object.entries(classes)) {
      pairs.push([cls.replace('_', ' '), a.available + ' / ' + a.total + ' available']);
    }
    $('selected-details').replaceChildren(...pairs.flatMap(([k, v]) => [el('dt', null, k), el('dd', null, v)]));
  }

  // ------------------------------------------------------------------ commands and envelopes
  function renderCommands(s) {
    const rows = s.commands.map((c) => el('tr', { 'data-command': c.command_id },
      td(c.command_id, 'text id'),
      td(c.type + (c.mode ? ' (' + c.mode + ')' : ''), 'text type'),
      td(c.target, 'text target'),
      td(c.state, 'state state-' + c.state),
      td(kw(c.requested_kw), 'requested'),
      td(kw(c.committed_kw), 'committed'),
      td(c.delivered_kw === null ? '—'
        : kw(c.delivered_kw) + ' [' + kw(c.delivered_lower_kw) + ' … ' + kw(c.delivered_upper_kw) + ']',
      'delivered' + (c.short ? ' short' : '')),
      td(kw(c.shortfall_kw), 'shortfall'),
      td(c.devices, 'devices'),
      c.type === 'dispatch' ? reportLinks(c.command_id) : td('')));
    $('commands').tBodies[0].replaceChildren(...rows);
    $('no-commands').hidden = rows.length > 0;
  }

  function renderEnvelopes(s) {
    const rows = s.envelopes.map((e) => el('tr', { 'data-envelope': e.command_id },
      td(e.command_id, 'text id'),
      td(e.target, 'text target'),
      td(e.state, 'state state-' + e.state),
      td(kw(e.import_limit_kw), 'import-limit'),
      td(kw(e.export_limit_kw), 'export-limit'),
      td(kw(e.measured_kw), 'measured'),
      td(kw(e.import_headroom_kw), 'import-headroom'),
      td(kw(e.export_headroom_kw), 'export-headroom'),
      td(e.outside ? 'outside' : 'inside', 'status status-' + (e.outside ? 'outside' : 'inside')),
      td(Math.round(e.seconds_outside) + ' / ' + Math.round(e.seconds_in_force) + ' s', 'outside-time'),
      reportLinks(e.command_id)));
    $('envelopes').tBodies[0].replaceChildren(...rows);
    $('no-envelopes').hidden = rows.length > 0;
  }

  // ------------------------------------------------------------------ availability
  function renderAvailability(s) {
    const classes = Object.keys(s.availability_by_class);
    const cell = (a) => (a ? a.available + ' / ' + a.total : '');
    const byClass = $('availability-class');
    byClass.tHead.replaceChildren(el('tr', null, el('th', null, 'Class'), el('th', null, 'Available')));
    byClass.tBodies[0].replaceChildren(...classes.map((c) => el('tr', { 'data-class': c },
      td(c.replace('_', ' '), 'text'), td(cell(s.availability_by_class[c]), 'available'))));
    const byGroup = $('availability-group');
    byGroup.tHead.replaceChildren(el('tr', null, el('th', null, 'Group'),
      ...classes.map((c) => el('th', null, c.replace('_', ' ')))));
    byGroup.tBodies[0].replaceChildren(...Object.entries(s.availability_by_group).map(([gid, counts]) =>
      el('tr', { 'data-group': gid }, td(gid, 'text'), ...classes.map((c) => td(cell(counts[c]))))));
  }

  // ------------------------------------------------------------------ reports
  function renderRecent(s) {
    $('recent').replaceChildren(...s.recent.map((r) => el('li', { 'data-command': r.command_id },
      r.command_id + ' (' + r.type + ', ' + r.state + ') ',
      ...(r.type === 'dispatch' || r.type === 'envelope'
        ? [el('a', { href: reportUrl(r.command_id, 'svg', true), target: '_blank', rel: 'noopener' }, 'svg'), ' ',
          el('a', { href: reportUrl(r.command_id, 'csv', false), download: r.command_id + '.csv' }, 'csv')]
        : []))));
  }

  function updateReportLinks() {
    const id = $('report-id').value.trim();
    $('report-csv').href = id ? reportUrl(id, 'csv', false) : '#';
    $('report-svg').href = id ? reportUrl(id, 'svg', false) : '#';
  }

  async function showChart(event) {
    event.preventDefault();
    const id = $('report-id').value.trim();
    if (!id) return;
    const error = $('chart-error');
    error.hidden = true;
    const response = await fetch(reportUrl(id, 'svg', true), { cache: 'no-store' });
    if (!response.ok) {
      error.textContent = (await response.text()).trim();
      error.hidden = false;
      $('chart').replaceChildren();
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const img = el('img', { src: url, alt: 'report of ' + id });
    img.addEventListener('load', () => URL.revokeObjectURL(url));
    $('chart').replaceChildren(img);
  }

  // ------------------------------------------------------------------ the feed
  function render(s) {
    latest = s;
    $('gateway-id').textContent = s.gateway_id + ' · ' + s.version;
    $('updated').textContent = 'updated ' + new Date(s.timestamp).toISOString().slice(11, 19) + ' UTC';
    renderTree(s);
    renderGroups(s);
    renderSelected(s);
    renderCommands(s);
    renderEnvelopes(s);
    renderAvailability(s);
    renderRecent(s);
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  }

  function status(text, cls) {
    const conn = $('conn');
    conn.textContent = text;
    conn.className = 'conn ' + cls;
  }

  async function fetchSnapshot() {
    try {
      const response = await fetch(base + '/api/snapshot', { cache: 'no-store' });
      if (response.ok) render(await response.json());
    } catch (e) {
      status('offline', 'down');
    }
  }

  function connect() {
    source = new EventSource(base + '/events');
    source.addEventListener('snapshot', (event) => {
      status('live', 'live');
      render(JSON.parse(event.data));
    });
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (too many live views, or logged out): poll now and then try again.
        status('reconnecting…', 'down');
        fetchSnapshot();
        setTimeout(connect, 10000);
      } else {
        status('reconnecting…', 'down');
      }
    });
  }

  $('report-id').addEventListener('input', updateReportLinks);
  $('report-form').addEventListener('submit', showChart);
  fetchSnapshot();
  connect();
})();
