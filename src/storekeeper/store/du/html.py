"""The ``du --html`` report: one self-contained file (inline CSS and JS, no network).

A squarified treemap, two levels deep: the store's live bytes split into each
root's exclusive bytes and the groups of bytes shared by several roots; inside
each, its largest paths and one "smaller paths" remainder.  Click a box to zoom
into it (Escape or the path bar goes back), type in the search box to
highlight paths and roots, hover for details.  Every box is a ``div.node``
carrying ``data-depth``, ``data-bytes``, ``data-kind`` and ``data-label`` (a top box its
``data-id``, each of its children that id as ``data-parent``), so a test (or a
script) can read the tree back from the DOM.
"""

from __future__ import annotations

import json

from .space import SpaceReport

#: shared groups drawn one box each; the rest share one box
MAX_GROUPS = 150


def tree(report: SpaceReport) -> dict:
    """The treemap's tree: root → (roots' exclusive parts | shared groups) → paths."""
    def leaves(largest: list, total: int, paths: int) -> list[dict]:
        kids, used = [], 0
        for p in largest:
            b = p.group_bytes  # (a path's inodes shared with other groups are theirs)
            kids.append({"label": p.path, "bytes": b, "kind": "path", "narSize": p.nar_size,
                         "holders": p.holders})
            used += b
        if total - used > 0:
            kids.append({"label": f"({max(0, paths - len(kids))} smaller paths)",
                         "bytes": total - used, "kind": "rest"})
        return kids

    top = []
    seen: set[str] = set()
    for r in report.roots:
        if r.target in seen or r.exclusive_bytes == 0:
            continue
        seen.add(r.target)
        top.append({"label": r.link, "bytes": r.exclusive_bytes, "kind": "root", "target": r.target,
                    "owner": r.owner, "rootKind": r.kind, "closureBytes": r.closure_bytes,
                    "sharedBytes": r.shared_bytes,
                    "children": leaves(r.largest_exclusive, r.exclusive_bytes, r.exclusive_paths)})
    for g in report.groups[:MAX_GROUPS]:
        names = [report.roots[k].link for k in g.holders]
        top.append({"label": f"shared by {len(names)} roots", "bytes": g.bytes, "kind": "shared",
                    "holders": names, "children": leaves(g.largest, g.bytes, g.paths)})
    rest = report.groups[MAX_GROUPS:]
    if rest:  # (a big store has thousands of small groups: one box for them keeps the page light)
        b = sum(g.bytes for g in rest)
        top.append({"label": f"shared: {len(rest)} smaller groups", "bytes": b, "kind": "shared",
                    "holders": [], "children": [{"label": f"({sum(g.paths for g in rest)} paths)",
                                                 "bytes": b, "kind": "rest"}]})
    return {"label": "live store", "bytes": report.live_bytes, "kind": "store", "children": top}


def render(report: SpaceReport) -> str:
    data = json.dumps({"tree": tree(report), "unit": report.unit, "livePaths": report.live_paths},
                      separators=(",", ":"))
    # (no "</" can end the script early: JSON escapes it)
    return _PAGE.replace("__DATA__", data.replace("</", "<\\/"))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>storekeeper du</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh}
header{padding:6px 10px;background:#223;color:#eee;display:flex;gap:12px;align-items:center}
header input{flex:0 0 260px;padding:3px}
#crumbs span{cursor:pointer;text-decoration:underline}
#map{position:relative;flex:1;margin:4px}
.node{position:absolute;box-sizing:border-box;border:1px solid #fff;overflow:hidden;
 font-size:11px;color:#111;padding:1px 3px;white-space:nowrap;text-overflow:ellipsis}
.node[data-depth="1"]{border:2px solid #fff;font-weight:bold}
.node[data-depth="2"]{font-weight:normal;opacity:.9}
.node.dim{opacity:.25}.node.match{outline:3px solid #e22;z-index:2}
#info{padding:4px 10px;background:#eef;min-height:2.6em;font-family:monospace;white-space:pre}
</style></head><body>
<header><b>storekeeper du</b><input id="search" type="search" placeholder="search paths and roots">
<span id="crumbs"></span><span id="total"></span></header>
<div id="map"></div><div id="info">hover a box for details; click to zoom in</div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const map = document.getElementById("map"), info = document.getElementById("info");
function human(b){const u=["B","KiB","MiB","GiB","TiB"];let i=0;while(b>=1024&&i<4){b/=1024;i++}
 return (i?b.toFixed(1):b)+" "+u[i]}
function worst(row,w){let s=0,mx=0,mn=Infinity;for(const r of row){s+=r.a;mx=Math.max(mx,r.a);
 mn=Math.min(mn,r.a)}return Math.max(w*w*mx/(s*s),(s*s)/(w*w*mn))}
// squarified layout (Bruls et al.): rows along the shorter side while the aspect ratio improves
function squarify(items,x,y,w,h){
 const total=items.reduce((s,i)=>s+i.bytes,0),out=[];if(!total)return out;
 // (a box too small to show its contents still holds them, at zero size: search finds them)
 if(w<=1||h<=1)return items.filter(i=>i.bytes>0).map(i=>[i,x,y,0,0]);
 const sc=w*h/total;let rest=items.filter(i=>i.bytes>0).map(i=>({n:i,a:i.bytes*sc}));
 while(rest.length){const side=Math.min(w,h);let row=[rest[0]],k=1;
  while(k<rest.length&&worst(row.concat([rest[k]]),side)<=worst(row,side)){row.push(rest[k]);k++}
  rest=rest.slice(k);const s=row.reduce((t,r)=>t+r.a,0);
  if(w>=h){const cw=s/h;let cy=y;for(const r of row){const rh=r.a/cw;out.push([r.n,x,cy,cw,rh]);cy+=rh}
   x+=cw;w-=cw}else{const rh=s/w;let cx=x;for(const r of row){const cw2=r.a/rh;out.push([r.n,cx,y,cw2,rh]);
   cx+=cw2}y+=rh;h-=rh}}
 return out}
const COLORS={root:"#8cb4e8",shared:"#e8c38c",path:"#b8dca0",rest:"#ccc"};
function hue(i){return "hsl("+((i*47)%360)+",55%,72%)"}
let stack=[D.tree];
function details(n){let s=n.label+"\\n"+human(n.bytes)+" ("+n.bytes+" bytes)";
 if(n.kind==="root")s+="  exclusive; closure "+human(n.closureBytes)+", shared "+human(n.sharedBytes)+
  "; "+n.rootKind+" root of "+(n.owner||"-")+" -> "+n.target;
 if(n.kind==="shared")s+="  held by: "+n.holders.join(", ");
 if(n.kind==="path")s+="  NAR "+human(n.narSize)+", held by "+n.holders+" root(s)";return s}
function draw(){
 map.textContent="";const cur=stack[stack.length-1],W=map.clientWidth,H=map.clientHeight;
 const kids=(cur.children||[]).slice().sort((a,b)=>b.bytes-a.bytes);
 squarify(kids,0,0,W,H).forEach(([n,x,y,w,h],i)=>{
  const el=box(n,1,x,y,w,h,n.kind==="root"?hue(i):COLORS[n.kind]);el.dataset.id="b"+i;
  const inner=(n.children||[]).slice().sort((a,b)=>b.bytes-a.bytes);
  squarify(inner,x+3,y+16,w-6,h-19).forEach(([c,cx,cy,cw,ch])=>
   box(c,2,cx,cy,cw,ch,COLORS[c.kind]).dataset.parent="b"+i);
  el.onclick=()=>{if(n.children){stack.push(n);draw()}}});
 const c=document.getElementById("crumbs");c.textContent="";
 stack.forEach((n,i)=>{const s=document.createElement("span");s.textContent=n.label;
  s.onclick=()=>{stack=stack.slice(0,i+1);draw()};c.appendChild(s);c.append(" / ")});
 document.getElementById("total").textContent=human(cur.bytes)+" in "+(stack.length===1?
  D.livePaths+" live paths":"this box")+" ("+D.unit+" bytes)";
 search()}
function box(n,depth,x,y,w,h,color){const el=document.createElement("div");el.className="node";
 el.dataset.depth=depth;el.dataset.bytes=n.bytes;el.dataset.label=n.label;el.dataset.kind=n.kind;
 el.style.cssText="left:"+x+"px;top:"+y+"px;width:"+Math.max(w,0)+"px;height:"+Math.max(h,0)+
  "px;background:"+color;el.textContent=(n.kind==="root"?n.label.replace(/^.*\\//,""):
  n.label.replace(/^.*\\/[a-z0-9]{32}-/,""))+" "+human(n.bytes);
 el.title=details(n);el.onmouseover=e=>{info.textContent=details(n);e.stopPropagation()};
 map.appendChild(el);return el}
function search(){const q=document.getElementById("search").value.toLowerCase();
 for(const el of map.querySelectorAll(".node")){const hit=q&&el.dataset.label.toLowerCase().includes(q);
  el.classList.toggle("match",!!hit);el.classList.toggle("dim",!!q&&!hit)}}
document.getElementById("search").oninput=search;
document.addEventListener("keydown",e=>{if(e.key==="Escape"&&stack.length>1){stack.pop();draw()}});
window.addEventListener("resize",draw);draw();
</script></body></html>
"""
