"""Step-1 response maps -> Step-2 pseudo-masks (Sec. 3.4), in the order the method runs them.

``prms`` picks one map per referred object (Eq. 10); ``crf`` turns it into confident fg/bg seeds;
``affinity`` learns inter-pixel affinities from those seeds; ``random_walk`` propagates the map along
them; ``refine`` chains these for one map and thresholds it; ``labels`` runs the whole
``make_pseudo_masks`` work over a split; ``report`` scores the result against GT (diagnostic only).
"""
